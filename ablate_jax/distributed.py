"""Several hosts, one program: ``jax.distributed`` set-up shared by every command.

Each command (``train``, ``anchors``, ``evaluate``, ``export``) takes the same flags:

    --coordinator_address=HOST:PORT --num_processes=N --process_id=I   # explicit
    --distributed                                                      # auto-detect (Cloud TPU VMs, SLURM)

and calls :func:`initialize_from_flags` before touching a device. Every process then sees the
global device list and runs the same program over one mesh. On CPU the collectives between
processes go through gloo, which is how the tests run several processes on one machine.

When a process dies, the coordination service notices its missing heartbeats within
``--heartbeat_timeout`` seconds and terminates every other process with an error naming the
dead task, so a pod slice never hangs on a lost host.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

log = logging.getLogger("ablate_jax")


# Programs depend only on the model's shapes and the config, not on the concept, so a second
# run (another concept, a resumed run, the next stage's command) compiles nothing.
DEFAULT_COMPILATION_CACHE = "~/.cache/ablate_jax/xla"


# XLA's CPU backend (jaxlib 0.10) hands every reduction to YNNPACK as a call of its own. A small
# UNet's GroupNorm, LayerNorm and softmax sums are hundreds of tiny reductions per step, which
# XLA's own fused loops run faster. On the 2-core benchmark machine, the same program compiled
# both ways: toy sampling +21%, toy train step +17%, the 1/5-width SD1-shaped train step +4%, its
# sampling -6% (docs/benchmarks.md, "Reductions out of YNNPACK"). Matrix products and convolutions stay with YNNPACK.
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-reduce"}
# An XLA flag the runtime does not know aborts the process, so the flags above are only added for
# the jaxlib releases they were measured with.
CPU_XLA_FLAGS_JAXLIB = ((0, 10),)


class DistributedError(RuntimeError):
    """The multi-process runtime cannot be started as asked; the message says why."""


def define_flags(flag_values: Any = None) -> None:
    """Adds the multi-process flags to ``flag_values`` (absl's global flags by default)."""
    from absl import flags  # noqa: PLC0415

    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process runs)",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes in the run", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes-1", flag_values=fv)
    flags.DEFINE_bool("distributed", False,
                      "call jax.distributed.initialize() with what the platform provides (Cloud TPU VM, SLURM)",
                      flag_values=fv)
    flags.DEFINE_integer("heartbeat_timeout", 100, "seconds without a heartbeat after which a process counts as "
                         "dead and the whole run stops", flag_values=fv)
    flags.DEFINE_integer("cpu_devices", None, "on a CPU backend, split the CPU into this many devices (one per "
                         "core runs a small model's many small ops side by side); default: JAX's own (1, or what "
                         "XLA_FLAGS says)", flag_values=fv)
    flags.DEFINE_string("compilation_cache", os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILATION_CACHE,
                        "folder (or gs:// URL) where compiled XLA programs are kept for later runs; 'none' turns it "
                        "off", flag_values=fv)


def initialize_from_flags(flag_values: Any = None) -> bool:
    """Starts the multi-process runtime if the flags ask for it; returns whether they did.

    Also points JAX's persistent compilation cache at ``--compilation_cache``.
    """
    from absl import flags  # noqa: PLC0415

    fv = flags.FLAGS if flag_values is None else flag_values
    tune_cpu_compiler()
    use_compilation_cache(fv.compilation_cache)
    if fv.cpu_devices is not None:
        set_cpu_devices(fv.cpu_devices)
    return initialize(coordinator_address=fv.coordinator_address, num_processes=fv.num_processes,
                      process_id=fv.process_id, auto=fv.distributed, heartbeat_timeout=fv.heartbeat_timeout)


def use_compilation_cache(path: str | None) -> str | None:
    """Keeps compiled programs in ``path`` from now on; ``None``, '' or 'none' leaves the cache off.

    Returns the folder used. JAX writes an entry for programs that took at least a second to
    compile, from process 0 only, and keys it on the program, the backend and its version.
    """
    if not path or path.lower() == "none":
        return None
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def tune_cpu_compiler() -> list[str]:
    """Adds :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS``; returns the flags it added.

    Adds nothing once JAX has started its backends (XLA has read ``XLA_FLAGS`` by then), for a
    flag ``XLA_FLAGS`` already sets (the user's choice wins), or on a jaxlib release the flags
    were not measured with. The flags change only how the CPU backend compiles.
    """
    from jax._src import xla_bridge  # noqa: PLC0415
    from jaxlib import version as jaxlib_version  # noqa: PLC0415

    if tuple(jaxlib_version.__version_info__[:2]) not in CPU_XLA_FLAGS_JAXLIB or xla_bridge.backends_are_initialized():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in CPU_XLA_FLAGS.items() if f"--{k}=" not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def set_cpu_devices(n: int) -> None:
    """Makes the CPU backend ``n`` devices; must run before JAX starts its backends.

    XLA's CPU code splits a large op across cores, but a tiny UNet's hundreds of small ops mostly
    run one after another and leave cores idle. With a device per core, the batch is split across
    the devices and their small ops run side by side.
    """
    if n < 1:
        raise DistributedError(f"--cpu_devices must be at least 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:
        raise DistributedError("--cpu_devices must be set before JAX starts (it already has)") from err


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False, heartbeat_timeout: int = 100) -> bool:
    """``jax.distributed.initialize`` with checked arguments; returns False when nothing asks for it.

    Must run before the first device is touched. Raises :class:`DistributedError` with one line
    for incomplete or inconsistent arguments and for a coordinator that cannot be reached.
    """
    explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                "--process_id": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if not given and not auto:
        return False
    if given and not auto and len(given) < 3:
        missing = [k for k in explicit if k not in given]
        raise DistributedError(f"{', '.join(given)} also needs {' and '.join(missing)} (or --distributed to "
                               "detect them from the platform)")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num_processes must be at least 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise DistributedError(f"--process_id must be in 0..{num_processes - 1}, got {process_id}")
    if heartbeat_timeout < 1:
        raise DistributedError(f"--heartbeat_timeout must be at least 1 second, got {heartbeat_timeout}")
    # Only the CPU backend reads this; it lets processes on CPUs exchange collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout)
    except (RuntimeError, ValueError) as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise DistributedError(f"cannot start the multi-process runtime: {first}") from err
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Whether this process writes shared files (metadata, reports, exports)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)
