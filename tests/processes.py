"""Several local processes of one command (``jax.distributed`` on 127.0.0.1, gloo collectives), as the
hosts of a pod slice run it; used by test_multihost.py and test_sweep.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROCESSES, DEVICES_PER_PROCESS = 2, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir: str | Path, arg: str, logs: Path, env_extra: dict | None = None, heartbeat_timeout: int = 60,
           step_delay: float = 0.0, module: str = "ablate_jax.train", extra: tuple[str, ...] = ()
           ) -> list[subprocess.Popen]:
    """Starts ``python -m MODULE --config=configs/xattn.py:ARG --workdir=WORKDIR EXTRA...`` as PROCESSES
    processes of one run; their output goes to ``logs``.

    The heartbeat timeout is generous by default: on a loaded 2-core machine a process importing
    TensorFlow's reader can miss heartbeats for over 10 s, and the service then ends a healthy run.
    """
    port = free_port()
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
        **(env_extra or {}),
    })
    env.pop("CI", None)
    procs = []
    for pid in range(PROCESSES):
        # With a delay, through tests/slow.py, which pauses after each train step.
        runner = [str(ROOT / "tests" / "slow.py"), f"--step_delay={step_delay}"] if step_delay else ["-m"]
        cmd = [sys.executable, *runner, module, f"--config={ROOT / 'configs' / 'xattn.py'}:{arg}",
               f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={PROCESSES}",
               f"--process_id={pid}", f"--heartbeat_timeout={heartbeat_timeout}", *extra]
        log = open(logs / f"process{pid}.log", "w")  # noqa: SIM115  (closed with the process)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=logs))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """The processes' exit codes; any still running at ``timeout`` seconds is killed."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes
