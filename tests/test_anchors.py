"""Anchor generation: the same dataset on any number of devices or processes, resumption after a
real kill, a finished set left alone, clear refusals, memorized images dropped.

Compilation dominates the cost here, so every run uses the shipped toy model with one sampling
setting and one image per device: the in-process runs share one compiled program (on a
1-device mesh), and the subprocesses (8 devices, like this process) share theirs through a
persistent compilation cache.

XLA's CPU backend compiles differently for a process with 1 virtual device and one with 8 (the
thread partitioning of the kernels changes), which moves the last float bit of a few pixels.
Device-count independence is therefore checked between processes with the same virtual device
count, where it is exact, and a mesh over 1 or all 8 of their devices.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ablate_jax import anchors, distributed, memorization, sharding
from ablate_jax.anchor_store import AnchorError, anchors_dir, open_anchors, shard_name
from ablate_jax.anchors import generate_anchors
from ablate_jax.config import ANCHOR_KEYS, anchor_sampling, fingerprint, prepare
from ablate_jax.models import load_pipeline
from ablate_jax.toy import shipped_path, world
from ablate_jax.workdir import WorkdirError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "xattn.py"
# 20 images in shards of 8 (the last one short); 8 steps is enough for the toy model to reproduce
# its memorized image, which the memorization test relies on.
TINY = {"anchors.num_images": 20, "anchors.steps": 8, "anchors.shard_size": 8, "anchors.batch_size": 1}


def make_config(**overrides):
    spec = importlib.util.spec_from_file_location("xattn_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in {**TINY, **overrides}.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def cli_flags(workdir, **overrides):
    return [f"--config={CONFIG}", f"--workdir={workdir}", "--noprogress"] + [
        f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


def read_all(workdir):
    return list(open_anchors(workdir))


def assert_same_examples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x["index"], x["prompt"], x["seed"]) == (y["index"], y["prompt"], y["seed"])
        np.testing.assert_array_equal(x["image"], y["image"])


def tree(path):
    """Every file under ``path`` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).rglob("*"))}


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(shipped_path("pipeline"))


@pytest.fixture(scope="module")
def mesh1():
    assert len(jax.devices()) == 8
    return sharding.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def reference(pipe, mesh1, tmp_path_factory):
    """An uninterrupted in-process run on one device."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = generate_anchors(make_config(), workdir, pipeline=pipe, mesh=mesh1, progress=False)
    return workdir, summary, read_all(workdir)


def test_dataset_layout_and_contents(reference):
    workdir, summary, examples = reference
    out = anchors_dir(workdir)
    assert summary["num_images"] == 20 and summary["dropped"] == 0 and not summary["skipped"]
    assert summary["generated"] == 20 and summary["num_shards"] == 3 and summary["seconds"] > 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([shard_name(s, 3) for s in range(3)] + [
        "dataset_info.json", "features.json", "preview.png", "run.json"])  # tmp/ is gone
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] and run["fingerprint"] == fingerprint(make_config(), *ANCHOR_KEYS)
    assert run["shard_lengths"] == [8, 8, 4]

    prompts = prepare(make_config()).concept.usable_anchor_prompts()
    assert [e["index"] for e in examples] == list(range(20))
    assert all(e["prompt"] == prompts[e["index"] % len(prompts)] and e["seed"] == 0 for e in examples)
    assert all(e["image"].dtype == np.uint8 and e["image"].shape == (32, 32, 3) for e in examples)
    assert len({e["image"].tobytes() for e in examples}) == 20
    source = open_anchors(workdir)
    assert len(source) == 20 and source[-1]["index"] == 19
    with pytest.raises(IndexError):
        source[20]


def test_killed_run_on_8_devices_resumes_on_1_device_to_the_same_dataset(reference, pipe, mesh1, tmp_path, caplog):
    # The command line, in another process with all 8 devices, is killed once two of its three
    # shards are in place; a 1-device run here finishes the job. The result must equal the
    # uninterrupted 1-device run: neither the kill nor the device count changes an image.
    out = anchors_dir(tmp_path)
    second = out / shard_name(1, 3)
    env = dict(os.environ)
    # The command keeps its compiled programs in --compilation_cache; every one, however quick.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cache = tmp_path / "xla-cache"
    # tests/slow.py pauses after each shard, to kill the command in.
    cmd = [sys.executable, str(REPO / "tests" / "slow.py"), "--shard_delay=1.5", "ablate_jax.anchors",
           *cli_flags(tmp_path), f"--compilation_cache={cache}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None or not second.exists():
            proc.kill()
            pytest.fail("the run ended or stalled before its second shard:\n" + proc.communicate()[1].decode()[-3000:])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    finished = [s for s in range(3) if (out / shard_name(s, 3)).exists()]
    assert finished == [0, 1] and not (out / "dataset_info.json").exists()
    assert any(cache.iterdir()), "the command wrote nothing to --compilation_cache"
    with pytest.raises(AnchorError, match="no complete anchor set"):
        open_anchors(tmp_path)
    # What a kill in the middle of writing leaves behind: never read, and cleared by the rerun.
    (out / "tmp" / f"{shard_name(2, 3)}.12345").write_bytes(b"half a shard")

    with caplog.at_level("INFO", logger="ablate_jax"):
        summary = generate_anchors(make_config(), tmp_path, pipeline=pipe, mesh=mesh1, progress=False)
    assert summary["resumed_shards"] == 2 and summary["generated"] == 4 and summary["num_images"] == 20
    assert "2 of 3 shards were already written" in summary["message"]
    assert any("resuming, 2 of 3 shards already written" in r.getMessage() for r in caplog.records)
    assert_same_examples(read_all(tmp_path), reference[2])
    assert not (out / "tmp").exists()


def test_rerun_of_a_finished_set_does_nothing_and_says_so(reference, capsys):
    workdir = reference[0]
    before = tree(workdir)
    assert anchors.main(["anchors", *cli_flags(workdir)]) == 0
    assert "anchors already complete: 20 images in 3 shards" in capsys.readouterr().out
    summary = generate_anchors(make_config(), workdir, progress=False)  # no pipeline: none is loaded
    assert summary["skipped"] and summary["num_images"] == 20 and summary["generated"] == 0
    assert tree(workdir) == before


def test_processes_write_disjoint_shards_of_the_same_dataset(reference, pipe, mesh1, tmp_path, monkeypatch):
    # Two threads stand in for two processes: each draws its own shards (0 and 2, or 1), then
    # process 0 writes the metadata once both have passed the barrier.
    local = threading.local()
    barrier = threading.Barrier(2, timeout=120)
    class TwoProcesses:
        """jax as the anchors module sees it, in a thread standing in for a process."""

        def __getattr__(self, name):
            return getattr(jax, name)

        def process_index(self):
            return local.index

        def process_count(self):
            return 2

    monkeypatch.setattr(anchors, "jax", TwoProcesses())
    monkeypatch.setattr(distributed, "barrier", lambda name: barrier.wait())
    results, errors = {}, []

    def process(index):
        local.index = index
        try:
            results[index] = generate_anchors(make_config(), tmp_path, pipeline=pipe, mesh=mesh1, progress=False)
        except BaseException as e:  # noqa: BLE001  (re-raised by the test below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0]["generated"] == 12 and results[1]["generated"] == 8
    assert results[0]["num_images"] == results[1]["num_images"] == 20
    assert_same_examples(read_all(tmp_path), reference[2])


@pytest.mark.parametrize("case, expected", [
    ("empty_prompts", "has no prompts"),
    ("anchor_absent", "the anchor word 'zebra' appears in none of the"),
    ("zero_images", "anchors.num_images must be a positive integer, got 0"),
    ("negative_images", "anchors.num_images must be a positive integer, got -4"),
    ("zero_shard_size", "anchors.shard_size must be a positive integer, got 0"),
    ("unknown_key", "unknown config key 'anchors.bogus' (from --config.anchors.bogus=1)"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, expected, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# no prompts here\n")
    overrides = {
        "empty_prompts": {"concept.anchor_prompts": empty},
        "anchor_absent": {"concept.anchor": "zebra"},
        "zero_images": {"anchors.num_images": 0},
        "negative_images": {"anchors.num_images": -4},
        "zero_shard_size": {"anchors.shard_size": 0},
        "unknown_key": {"anchors.bogus": 1},
    }[case]
    workdir = tmp_path / "run"
    assert anchors.main(["anchors", *cli_flags(workdir, **overrides)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not workdir.exists()


def test_workdir_of_another_run_is_refused_and_left_alone(reference, tmp_path, capsys):
    workdir = reference[0]
    before = tree(workdir)
    assert anchors.main(["anchors", *cli_flags(workdir, **{"concept.preset": "toy_striped"})]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds anchors of another run" in err[0] and "concept.preset" in err[0], err
    with pytest.raises(WorkdirError, match=r"holds anchors of another run \(seed: 0 -> 3\)"):
        generate_anchors(make_config(seed=3), workdir, progress=False)
    (tmp_path / "anchors").mkdir()
    (tmp_path / "anchors" / "notes.txt").write_text("mine")
    with pytest.raises(WorkdirError, match="not an anchor set"):
        generate_anchors(make_config(), tmp_path, progress=False)
    assert tree(workdir) == before


def test_memorized_images_are_dropped_and_counted(pipe, mesh1, tmp_path, caplog):
    # Half the anchor images are of the memorized caption itself, so the toy model reproduces the
    # memorized image for them; the paraphrase draws something else. (The third prompt is set
    # aside for evaluation.)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{world.MEMORIZED_CAPTION}\nan orange star on a dark wavy background\n"
                       "an orange star against waves\n")
    config = make_config(**{"concept.preset": "toy_memorized", "concept.anchor_prompts": str(prompts),
                            "anchors.num_images": 16})
    with caplog.at_level("INFO", logger="ablate_jax"):
        summary = generate_anchors(config, tmp_path, pipeline=pipe, mesh=mesh1, progress=False)
    kept = read_all(tmp_path)
    assert summary["dropped"] >= 4 and summary["num_images"] == len(kept) == 16 - summary["dropped"]
    assert "dropped as memorized" in summary["message"]
    assert any("reproduce the memorized image" in r.getMessage() for r in caplog.records)
    run = json.loads((anchors_dir(tmp_path) / "run.json").read_text())
    assert run["dropped"] == summary["dropped"] and run["memorization"]["measure"] == "toy_world"
    images = np.stack([e["image"] for e in kept])
    assert np.all(world.memorization_similarity(images) <= world.MEMORIZATION_THRESHOLD)
    dropped = set(range(16)) - {e["index"] for e in kept}
    assert all(i % 2 == 0 for i in dropped)  # only images of the memorized caption are dropped


def test_clip_measure_flags_reproductions_of_the_memorized_caption(pipe, mesh1):
    # The measure used for real models, here with the toy world's CLIP: new samples of the
    # memorized caption are close to the base model's own samples of it; the paraphrases' are not.
    # The toy world's pixel detector is the ground truth: at 8 sampling steps a sample of the
    # caption can come out loose enough that neither measure calls it a copy.
    from ablate_jax.models import load_clip
    from ablate_jax.text_to_image import draw as sample

    spec = prepare(make_config(**{"concept.preset": "toy_memorized"}))
    config, concept = spec.config, spec.concept
    measure = memorization.clip_reference_measure(spec, pipe, mesh1, load_clip(shipped_path("clip")))
    assert measure.name == "clip" and measure.threshold == config.anchors.memorization_threshold
    assert measure.references.shape == (config.anchors.memorization_references, 32, 32, 3)
    cfg = anchor_sampling(config)
    key = jax.random.key(1)  # other seeds than the references'
    copies = sample(pipe, pipe.params, [world.MEMORIZED_CAPTION] * 8, key, cfg, batch_size=1, mesh=mesh1)
    others = sample(pipe, pipe.params, list(concept.anchor_prompts[:8]), key, cfg, batch_size=1, mesh=mesh1)
    assert measure.memorized(copies).sum() >= 6 and not measure.memorized(others).any()
    images = np.concatenate([copies, others])
    truth = world.memorization_similarity(images) > world.MEMORIZATION_THRESHOLD
    np.testing.assert_array_equal(measure.memorized(images), truth)
