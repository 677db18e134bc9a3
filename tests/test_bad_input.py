"""Hostile input: every case ends in one ``error:`` line and exit status 1, before any work, and leaves
the workdir as it was; training that diverges never reaches a checkpoint or an export.

Most cases run ``ablate_jax.train.main`` in this process (the command's own code path, without a
second interpreter's start-up); a few run the real ``python -m ablate_jax.train`` to show that no
traceback escapes.
"""

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from ablate_jax import checkpointing, export, storage, toy, train
from ablate_jax.workdir import open_workdir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "xattn.py")
# Small enough to run whole several times: a few anchors and steps, no evaluation.
TINY = ("anchors.num_images=16,anchors.steps=3,anchors.shard_size=8,train.steps=4,train.checkpoint_every=2,"
        "train.log_every=2,preserve.weight=0,eval.enabled=False")


def snapshot(path: Path):
    """Every file and folder under ``path`` with its size and modification time (None: ``path`` absent)."""
    if not path.exists():
        return None
    if path.is_file():
        st = path.stat()
        return [(str(path), st.st_size, st.st_mtime_ns)]
    return sorted((str(p), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns) for p in path.rglob("*"))


def run_main(capsys, workdir, *args, arg: str = "", config: str = CONFIG):
    argv = ["train", f"--config={config}" + (f":{arg}" if arg else ""), *args]
    if workdir is not None:
        argv.append(f"--workdir={workdir}")
    code = train.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(code: int, err: str, *fragments: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert code == 1, (code, err)
    assert len(errors) == 1 and not any("Traceback" in ln for ln in lines), err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def tiny_config(extra: str = ""):
    return train.config_lib.finalize(train.config_lib.base_config(), TINY + extra)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, toy_pipe):
    """A finished tiny run (anchors, 4 steps, export) that the cases below must leave as it is."""
    workdir = tmp_path_factory.mktemp("finished") / "w"
    train.run(tiny_config(), workdir, pipeline=toy_pipe, progress=False)
    return workdir


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "w"
    shutil.copytree(finished, out)
    return out


# ------------------------------------------------------------------------------------------------ before any work


@pytest.mark.parametrize(
    ("args", "arg", "fragments"),
    [
        (["--config.train.stepz=3"], "", ["unknown config key 'train.stepz'", "--config.train.stepz=3"]),
        (["--config.train.steps=abc"], "", ["config key 'train.steps' needs an integer, got 'abc'"]),
        ([], "train.stepz=3", ["unknown config key 'train.stepz'"]),
        ([], "train.learning_rate=nan", ["train.learning_rate must be a positive number, got nan"]),
        ([], "train.checkpoint_every=0", ["train.checkpoint_every must be a positive integer, got 0"]),
        ([], "train.log_every=0", ["train.log_every must be a positive integer, got 0"]),
        ([], "eval.num_images=1", ["eval.num_images must be at least 2"]),
        ([], "eval.sets=smiley;smilie", ["eval.sets names 'smilie'", "smiley_paraphrase"]),
        ([], "train.batch_size=12", ["train.batch_size 12 is not a multiple of the 8 devices"]),
        ([], "concept.preset=,concept.kind=instance,concept.target=my character,concept.anchor=cat,"
             "concept.anchor_prompts=anchor_cat,preserve.weight=4", ["preserve.weight=4 but the concept names nothing"]),
        ([], "model=/nonexistent/sd", ["model folder /nonexistent/sd does not exist"]),
        ([], "eval.clip=/nonexistent/clip", ["eval.clip='/nonexistent/clip'", "does not exist"]),
    ],
)
def test_bad_config_fails_in_one_line_before_anything(capsys, tmp_path, args, arg, fragments):
    workdir = tmp_path / "w"
    code, err = run_main(capsys, workdir, *args, arg=arg)
    assert_one_line(code, err, *fragments)
    assert not workdir.exists()


def test_a_real_model_needs_a_real_evaluator_that_can_be_reached(capsys, tmp_path, tiny_sd1_path):
    # Scored by the toy world's evaluator: refused, naming the key to set.
    code, err = run_main(capsys, tmp_path / "w", arg=f"model={tiny_sd1_path},eval.clip=toy")
    assert_one_line(code, err, "eval.clip='toy' would score", "--config.eval.clip")
    # The default evaluator is a hub id, which this machine cannot fetch (the tests run offline).
    code, err = run_main(capsys, tmp_path / "w", arg=f"model={tiny_sd1_path}")
    assert_one_line(code, err, "eval.clip='openai/clip-vit-large-patch14'", "reachable hub id")
    assert not (tmp_path / "w").exists()


def test_a_missing_config_file(capsys, tmp_path):
    code, err = run_main(capsys, tmp_path / "w", config=str(tmp_path / "nope.py"))
    assert_one_line(code, err, f"config file {tmp_path / 'nope.py'} does not exist")
    assert not (tmp_path / "w").exists()


def test_a_workdir_that_is_a_file(capsys, tmp_path):
    workdir = tmp_path / "w"
    workdir.write_text("not a folder")
    before = snapshot(workdir)
    code, err = run_main(capsys, workdir)
    assert_one_line(code, err, f"--workdir {workdir} is a file")
    assert snapshot(workdir) == before


@contextlib.contextmanager
def _read_only_folder():
    """A folder this process cannot write in, with the process's identity to try it under.

    File modes do not bind root, so as root the check runs with the effective user ``nobody``
    (the real user stays root, which lets the test switch back).
    """
    base = Path(tempfile.mkdtemp(prefix="ablate_jax-ro-"))
    base.chmod(0o755)
    folder = base / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.geteuid() != 0:
            yield folder
            return
        try:
            os.seteuid(65534)
        except OSError:
            pytest.skip("root without the right to switch users: no way to make a folder read-only here")
        try:
            yield folder
        finally:
            os.seteuid(0)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_a_read_only_workdir(capsys):
    with _read_only_folder() as folder:
        workdir = folder / "run"
        code, err = run_main(capsys, workdir, "--compilation_cache=none")
    assert_one_line(code, err, f"--workdir {workdir} is not writable")
    assert not workdir.exists()


def test_a_truncated_or_broken_weight_file(capsys, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(toy.shipped_path("pipeline"), model)
    weights = next((model / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, err = run_main(capsys, tmp_path / "w", arg=f"model={model}")
    assert_one_line(code, err, f"{weights} is truncated")
    weights.write_bytes(b"\xff" * 8 + data[8:])  # a header length no file can hold
    code, err = run_main(capsys, tmp_path / "w", arg=f"model={model}")
    assert_one_line(code, err, f"{weights} has a broken safetensors header")
    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    code, err = run_main(capsys, tmp_path / "w", arg=f"model={model}")
    assert_one_line(code, err, f"{weights} has a broken safetensors header")
    assert not (tmp_path / "w").exists()


def test_a_gs_workdir_without_credentials(capsys, monkeypatch):
    import gcsfs.retry

    # No emulator and no credentials; the metadata server lookup fails at once on a closed port.
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    # gcsfs backs off for about a minute over six tries; the outcome is the same without the waits.
    real_sleep = asyncio.sleep
    monkeypatch.setattr(gcsfs.retry.asyncio, "sleep", lambda _s, *a, **k: real_sleep(0))
    code, err = run_main(capsys, "gs://ablate-jax-no-such-bucket/run")
    assert_one_line(code, err, "cannot reach --workdir gs://ablate-jax-no-such-bucket/run")


@pytest.mark.parametrize("target", ["../../x", " ".join(["word"] * 500), "a/b\\c:d*e?"])
def test_default_workdir_names_stay_one_bounded_folder(target):
    config = train.config_lib.resolve(train.config_lib.finalize(
        train.config_lib.base_config(), f"concept.preset=,concept.kind=instance,concept.target={target},"
                                        "concept.anchor=cat,concept.anchor_prompts=anchor_cat"))
    name = train.default_run_name(config)
    assert "/" not in name and "\\" not in name and ".." not in name and len(name) <= 80, name
    path = (Path("workdirs") / name).resolve()
    assert path.parent == Path("workdirs").resolve()


# ------------------------------------------------------------------------------------------------ a finished run


def test_rerunning_a_finished_run_with_more_steps_is_refused_before_training(capsys, finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    before = snapshot(workdir)
    code, err = run_main(capsys, workdir, "--config.train.steps=6", arg=TINY)
    assert_one_line(code, err, "holds checkpoints of another run", "train.steps")
    assert snapshot(workdir) == before


def _latest_data_files(workdir: Path) -> list[Path]:
    step = checkpointing.manager(workdir).latest_step()
    folder = workdir / "checkpoints" / str(step) / "state"
    return sorted(p for p in folder.rglob("*") if p.is_file() and "d" in p.parent.name and p.stat().st_size > 0)


def test_a_checkpoint_with_damaged_bytes_is_refused_in_one_line(capsys, finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    shutil.rmtree(workdir / "export")
    files = _latest_data_files(workdir)
    assert files, "no data files in the checkpoint"
    for f in files:  # one flipped bit in the middle of each data file
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    before = snapshot(workdir)
    code = export.main(["export", f"--config={CONFIG}:{TINY}", f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert_one_line(code, err, "checkpoint 4 in", f"delete {workdir / 'checkpoints' / '4'}")
    assert snapshot(workdir) == before


def test_restored_values_that_do_not_match_their_checksums_are_refused(tmp_path):
    """Values that read back without an error but differ from what was saved (the case a checksum is for)."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    state = {"step": jnp.int32(3), "params": {"w": jnp.arange(6, dtype=jnp.float32)}}
    mngr = checkpointing.manager(tmp_path)
    wrong = checkpointing.checksums({**state, "params": {"w": state["params"]["w"].at[2].add(1e-6)}})
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"step": 3}),
                                         checksum=ocp.args.JsonSave(wrong)))
    mngr.wait_until_finished()
    abstract = checkpointing.abstract_state(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    with pytest.raises(checkpointing.CheckpointError, match=r"is damaged: 1 of its arrays .* \['params'\]\['w'\]"):
        checkpointing.restore(mngr, abstract)
    # The sums see a value moved as well as a value changed.
    swapped = state["params"]["w"][jnp.array([1, 0, 2, 3, 4, 5])]
    assert checkpointing.checksums({"w": swapped}) != checkpointing.checksums({"w": state["params"]["w"]})


def test_a_checkpoint_with_a_missing_data_file_is_refused_in_one_line(capsys, finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    shutil.rmtree(workdir / "export")
    for f in _latest_data_files(workdir):
        f.unlink()
    code = export.main(["export", f"--config={CONFIG}:{TINY}", f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert_one_line(code, err, "checkpoint 4 in", "cannot be restored")
    assert not (workdir / "export").exists()


def test_the_export_refuses_non_finite_parameters(finished, tmp_path, toy_pipe):
    from ablate_jax import config as config_lib

    config = config_lib.resolve(tiny_config())
    workdir = copy_of(finished, tmp_path)
    shutil.rmtree(workdir / "export")
    ablated = checkpointing.restore_ablated_params(open_workdir(config, workdir), toy_pipe)
    selection = checkpointing.selection_for(config, toy_pipe, config_lib.concept_from_config(config))
    trained = {k: np.asarray(v).copy() for k, v in selection.split(ablated).items()}
    first = sorted(trained)[0]
    trained[first].reshape(-1)[3] = np.nan
    with pytest.raises(export.ExportError, match=r"holds NaN or infinite values \(" + first):
        export.export_run(config, workdir, pipeline=toy_pipe, ablated_params=selection.merge(toy_pipe.params, trained))
    assert not (workdir / "export").exists()


# ------------------------------------------------------------------------------------------------ diverging training


# These run in this process with the session's toy model, so they share its compiled programs;
# the command's own error line is the exception's message (checked through train.main above).


def with_anchors_of(finished: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "w"
    shutil.copytree(finished / "anchors", workdir / "anchors")
    return workdir


def test_diverging_training_never_reaches_a_checkpoint_or_an_export(finished, tmp_path, toy_pipe):
    workdir = with_anchors_of(finished, tmp_path)
    config = tiny_config(",train.steps=1,train.checkpoint_every=1,train.learning_rate=1e9")
    with pytest.raises(train.TrainError, match=r"^training diverged by step 1: .*last good checkpoint: none\)"):
        train.run(config, workdir, pipeline=toy_pipe, progress=False)
    assert checkpointing.manager(workdir).latest_step() is None
    assert not (workdir / "export").exists()


def test_a_run_that_diverges_later_keeps_its_last_good_checkpoint_and_names_it(finished, tmp_path, toy_pipe):
    workdir = with_anchors_of(finished, tmp_path)
    # At this rate the probe loss is 4.6, 3.3 and 4.6 times its start after steps 1 to 3 and 5.8
    # times after step 4: with the bound at 5, step 4 is the first that may not be saved.
    config = tiny_config(",train.checkpoint_every=1,train.learning_rate=0.01,train.divergence_factor=5")
    with pytest.raises(train.TrainError, match=r"diverged by step 4: .* over 5 times .*last good checkpoint: step 3\)"):
        train.run(config, workdir, pipeline=toy_pipe, progress=False)
    assert checkpointing.manager(workdir).latest_step() == 3
    assert not (workdir / "export").exists()


def test_cli_subprocess_prints_one_line_and_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for extra in (["--config.train.stepz=3"], ["--config.train.steps=abc"]):
        out = subprocess.run([sys.executable, "-m", "ablate_jax.train", f"--config={CONFIG}",
                              f"--workdir={tmp_path / 'w'}", *extra], env=env, capture_output=True, text=True,
                             timeout=300)
        assert_one_line(out.returncode, out.stderr)
    assert not (tmp_path / "w").exists()
    assert storage.path(tmp_path).exists()
