"""Several processes, one run: ``jax.distributed`` on 127.0.0.1 (gloo collectives) against one
process with the same 8 devices.

The 2-process run works in a ``gs://`` work directory, as runs on a pod slice do, on a local
Cloud Storage emulator (the ``gcs_bucket`` fixture); the 1-process reference uses a local folder.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from processes import PROCESSES, launch, wait

from ablate_jax import anchor_store, anchors, checkpointing, distributed, export, storage, train
from ablate_jax.config import concept_from_config
from ablate_jax.workdir import open_workdir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import xattn  # noqa: E402

# Two anchor shards (one per process), a short training run with two checkpoints, and a small
# evaluation, so every stage runs under several processes. The anchor and training settings are
# test_train.py's, so that the session compiles those programs once.
ARG = ("anchors.num_images=16,anchors.steps=3,anchors.shard_size=8,train.steps=4,train.checkpoint_every=2,"
       "train.log_every=2,preserve.weight=0,eval.num_images=4,eval.steps=4,eval.sets=smiley;frowny,"
       "eval.kid_subset_size=4,export.enabled=False")
# The bucket run also exports; TensorBoard events go through TensorFlow's GCS client, which
# cannot be pointed at the emulator, so that run logs its metrics to the log only.
BUCKET_ARG = ARG.replace("export.enabled=False", "export.enabled=True") + ",train.tensorboard=False"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, toy_pipe):
    """The reference: this process, 8 devices."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    report = train.run(xattn.get_config(ARG), workdir, pipeline=toy_pipe, progress=False)
    return workdir, report


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, gcs_bucket):
    """The same run as 2 processes of 4 devices each, in a work directory on the bucket."""
    base = tmp_path_factory.mktemp("two")
    workdir, logs = f"{gcs_bucket}/two/run", base / "logs"
    logs.mkdir()
    codes = wait(launch(workdir, BUCKET_ARG, logs), timeout=600)
    out = {pid: (logs / f"process{pid}.log").read_text() for pid in range(PROCESSES)}
    assert codes == [0] * PROCESSES, "\n".join(f"--- process {p} ---\n{t[-3000:]}" for p, t in out.items())
    return workdir, out, logs


def test_two_processes_write_the_anchor_set_of_one(one_process, two_processes):
    one, two = anchor_store.open_anchors(one_process[0]), anchor_store.open_anchors(two_processes[0])
    assert len(one) == len(two) == 16
    differing = 0
    for a, b in zip(one, two, strict=True):
        assert (a["prompt"], a["index"], a["seed"]) == (b["prompt"], b["index"], b["seed"])
        # Each process drew its own shard on its own 4 devices, with the per-device batch of the
        # 8-device run. XLA's CPU kernels still round differently in a process with 4 devices than
        # in one with 8 (a float difference of ~1e-7 that flips a rare uint8 rounding): equal up
        # to one grey level in a few values.
        diff = np.abs(a["image"].astype(int) - b["image"].astype(int))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.001 * diff.size, (a["index"], diff.max())
        differing += np.count_nonzero(diff)
    assert differing <= 0.0005 * 16 * one[0]["image"].size


def test_two_processes_train_the_parameters_of_one(one_process, two_processes, toy_pipe):
    config = xattn.get_config(ARG)
    sel = checkpointing.selection_for(config, toy_pipe, concept_from_config(config))
    # The 2-process checkpoint restores in this single process.
    one = sel.split(checkpointing.restore_ablated_params(open_workdir(config, one_process[0]), toy_pipe))
    two = sel.split(checkpointing.restore_ablated_params(open_workdir(config, two_processes[0]), toy_pipe))
    base = sel.split(toy_pipe.params)
    assert one.keys() == two.keys() and len(one) > 0
    for k in one:
        a, b = np.asarray(one[k]), np.asarray(two[k])
        assert np.abs(a - np.asarray(base[k])).max() > 0, f"{k} did not train"
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(a), k


def test_two_processes_report_like_one_and_only_process_0_writes(one_process, two_processes):
    workdir, logs, cwd = two_processes
    report = json.loads((storage.path(workdir) / "eval" / "report.json").read_text())
    ref = one_process[1]
    assert report["sets"].keys() == ref["sets"].keys()
    for name, entry in report["sets"].items():
        assert entry["clip_accuracy"] == ref["sets"][name]["clip_accuracy"], name
        for m in ("base", "ablated"):
            assert abs(entry["clip_score"][m] - ref["sets"][name]["clip_score"][m]) <= 1e-3, name
    # One table, printed by process 0 (that nothing else is left in the bucket is checked below).
    assert "CLIP accuracy" in logs[0] and "CLIP accuracy" not in logs[1]
    assert "in 2 processes" in logs[0]


def test_the_bucket_holds_the_whole_run_and_nothing_is_written_beside_it(two_processes):
    workdir, logs, cwd = two_processes
    root = storage.path(workdir)
    names = {p.name for p in root.iterdir()}
    assert names == {"anchors", "checkpoints", "config.json", "eval", "export"}, names
    resolved = json.loads((root / "config.json").read_text())
    assert resolved["family"] == "toy" and resolved["config"]["train"]["steps"] == 4
    assert (root / "anchors" / "run.json").exists() and (root / "anchors" / "preview.png").exists()
    assert not (root / "anchors" / anchor_store.TMP_DIR).exists()
    assert {"report.json", "report.md", "smiley.png"} <= {p.name for p in (root / "eval").iterdir()}
    assert (root / "export" / export.RECORD_FILE).exists()
    assert (root / "export" / export.PIPELINE_DIR / "model_index.json").exists()
    # A gs:// URL taken for a local path would have made a folder "gs:" in the working directory.
    assert sorted(p.name for p in cwd.iterdir()) == [f"process{p}.log" for p in range(PROCESSES)]


def test_the_export_on_the_bucket_holds_the_trained_parameters(one_process, two_processes, toy_pipe):
    config = xattn.get_config(ARG)
    sel = checkpointing.selection_for(config, toy_pipe, concept_from_config(config))
    delta = storage.path(two_processes[0]) / "export" / export.DELTA_FILE
    applied = sel.split(export.apply_delta(toy_pipe.params, delta))
    one = sel.split(checkpointing.restore_ablated_params(open_workdir(config, one_process[0]), toy_pipe))
    assert applied.keys() == one.keys() and len(one) > 0
    for k in one:
        a, b = np.asarray(one[k]), np.asarray(applied[k])
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(a), k


def test_a_rerun_on_the_bucket_finds_every_stage_done(two_processes, tmp_path):
    # One process now (8 devices): the run's files, not its process layout, say what is done.
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CI", None)
    cmd = [sys.executable, "-m", "ablate_jax.train", f"--config={ROOT / 'configs' / 'xattn.py'}:{BUCKET_ARG}",
           f"--workdir={two_processes[0]}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "anchors already complete: 16 images in 2 shards" in text, text[-3000:]
    assert "training already reached step 4 of 4; nothing to do" in text
    assert "already exported" in text
    assert f"workdir: {two_processes[0]}" in text
    assert list(tmp_path.iterdir()) == []
    record = json.loads((storage.path(two_processes[0]) / "export" / export.RECORD_FILE).read_text())
    assert record["checkpoint_step"] == 4


def test_a_dead_process_stops_the_others_with_a_clear_error(two_processes, tmp_path):
    # Train on the finished 2-process run's anchors for many steps, slowed down, and kill one
    # process once it is training.
    import fsspec

    workdir = tmp_path / "run"
    fsspec.filesystem("gs").get(two_processes[0].removeprefix("gs://") + "/anchors", str(workdir / "anchors"),
                                recursive=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = launch(workdir, ARG.replace("train.steps=4", "train.steps=200"), logs,
                    heartbeat_timeout=10, step_delay=0.5)
    try:
        deadline = time.monotonic() + 300
        while "for 200 steps" not in (logs / "process1.log").read_text():
            assert all(p.poll() is None for p in procs), (logs / "process0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        time.sleep(2)  # inside the training loop (or compiling its first step)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # Without the dead peer the survivor cannot finish a step; it must stop, not wait forever.
        code = procs[0].wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    survivor = (logs / "process0.log").read_text()
    assert code != 0
    assert time.monotonic() - killed_at < 120
    assert "heartbeat" in survivor and "another task died" in survivor, survivor[-3000:]
    assert not (workdir / "checkpoints" / "200").exists()


def test_fsdp_that_does_not_divide_the_devices_is_refused(tmp_path, toy_pipe):
    with pytest.raises(ValueError, match=r"mesh.fsdp=3 does not divide the 8 devices"):
        train.run(xattn.get_config(ARG + ",mesh.fsdp=3"), tmp_path / "run", pipeline=toy_pipe, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2"], "--num_processes also needs --coordinator_address and --process_id"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"], "--process_id must be in 0..1"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=0", "--process_id=0"], "--num_processes must be at least 1"),
    (["--cpu_devices=0"], "--cpu_devices must be at least 1"),
    # This test process started JAX long ago; a command would set it first thing.
    (["--cpu_devices=2"], "--cpu_devices must be set before JAX starts"),
])
def test_inconsistent_process_flags_are_one_line(flags, message, tmp_path, capsys):
    assert jax.device_count() == 8  # JAX has started in this process, whatever ran before
    argv = ["anchors", f"--config={ROOT / 'configs' / 'xattn.py'}", f"--workdir={tmp_path / 'run'}", *flags]
    assert anchors.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_compilation_cache_flag_defaults_to_the_environment_and_can_be_turned_off(monkeypatch):
    from absl import flags

    fv = flags.FlagValues()
    distributed.define_flags(fv)
    fv(["cmd"])
    # conftest points JAX_COMPILATION_CACHE_DIR at the session's cache; commands inherit it.
    assert fv.compilation_cache == os.environ["JAX_COMPILATION_CACHE_DIR"]
    before = jax.config.jax_compilation_cache_dir
    assert distributed.use_compilation_cache("none") is None
    assert distributed.use_compilation_cache("") is None
    assert jax.config.jax_compilation_cache_dir == before
    monkeypatch.setenv("HOME", "/home/someone")
    try:
        assert distributed.use_compilation_cache("~/xla") == "/home/someone/xla"
        assert jax.config.jax_compilation_cache_dir == "/home/someone/xla"
        assert distributed.use_compilation_cache("gs://b/xla") == "gs://b/xla"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_cpu_devices_flag_splits_the_cpu():
    # A fresh process, as a command starts: the flag wins over the XLA_FLAGS that conftest set.
    code = ("import sys, jax; from absl import flags; from ablate_jax import distributed; "
            "fv = flags.FlagValues(); distributed.define_flags(fv); fv(sys.argv); "
            "distributed.initialize_from_flags(fv); print(jax.device_count(), jax.default_backend())")
    out = subprocess.run([sys.executable, "-c", code, "--cpu_devices=3"], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
    assert out.stdout.split() == ["3", "cpu"]


_YNN_REDUCE_PROBE = """
import json, re, sys
from ablate_jax import distributed
added = distributed.tune_cpu_compiler()
import jax, jax.numpy as jnp
text = jax.jit(lambda x: jnp.tanh(x @ x).sum(-1)).lower(jnp.ones((64, 64))).compile().as_text()
# The computations that XLA hands to YNNPACK, and whether any of them holds a reduction.
ynn = set(re.findall(r"calls=%([\\w.-]+).*__ynn_fusion", text))
bodies = re.split(r"\\n(?=%|ENTRY)", text)
reduce_in_ynn = any(b.startswith("%" + name + " ") and " reduce(" in b for b in bodies for name in ynn)
print(json.dumps({"added": added, "dot_in_ynn": bool(ynn), "reduce_in_ynn": reduce_in_ynn}))
"""


@pytest.mark.parametrize("xla_flags, added", [
    ("", ["--xla_cpu_experimental_ynn_fusion_type=-reduce"]),
    # The user's own setting of the same flag wins (here: XLA's default list, unchanged).
    ("--xla_cpu_experimental_ynn_fusion_type=+reduce", []),
])
def test_commands_keep_reductions_out_of_ynnpack(xla_flags, added):
    out = subprocess.run([sys.executable, "-c", _YNN_REDUCE_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags})
    probe = json.loads(out.stdout.splitlines()[-1])
    assert probe["added"] == added
    assert probe["dot_in_ynn"]  # the matrix product still goes to YNNPACK
    assert probe["reduce_in_ynn"] == (not added)


def test_cpu_compiler_tuning_adds_nothing_once_jax_has_started(monkeypatch):
    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", "")
    assert distributed.tune_cpu_compiler() == []
    assert os.environ["XLA_FLAGS"] == ""
