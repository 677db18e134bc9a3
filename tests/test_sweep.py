"""Sweeps: many ablations trained in one program, each equal to the same run alone, resuming like a
run; the shared, content-addressed anchor store."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ablate_jax import anchor_store, anchors, checkpointing, evaluate, sweep, train
from ablate_jax.workdir import open_workdir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import xattn  # noqa: E402
from processes import PROCESSES, launch, wait  # noqa: E402

# test_train.py's tiny run (the session compiles its programs once).
TINY = ("anchors.num_images=16,anchors.steps=3,anchors.shard_size=8,train.steps=8,train.checkpoint_every=2,"
        "train.log_every=2,preserve.weight=0,eval.enabled=False,export.enabled=False")
LRS = ("3e-4", "1e-3")
EVAL = "eval.num_images=2,eval.steps=2,eval.kid_subset_size=2,eval.misspelling=False"
GRID = [f"train.learning_rate={','.join(LRS)}", "concept=toy_smiley,toy_striped"]


def _trained(config, workdir, pipe):
    """The run's trained leaves and the same leaves of the pretrained model."""
    wd = open_workdir(config, workdir)
    sel = checkpointing.selection_for(wd.spec.config, pipe, wd.spec.concept)
    return sel.split(checkpointing.restore_ablated_params(wd, pipe, sel)), sel.split(pipe.params)


def _relative_error(a, b, base):
    """|delta_a - delta_b| / |delta_a| over every trained leaf."""
    num = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)) for k in a)
    den = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(base[k], np.float64)) ** 2)) for k in a)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def grid(tmp_path_factory, toy_pipe):
    """Two rates x two concepts: four runs with batches of their own, in one program on the 8 devices."""
    root = tmp_path_factory.mktemp("sweep") / "grid"
    result = sweep.run(xattn.get_config(TINY), GRID, root, pipeline=toy_pipe, progress=False)
    return root, result


def test_every_run_of_a_sweep_trains_as_it_would_alone(grid, tmp_path, toy_pipe):
    root, result = grid
    runs = result["runs"]
    assert [r["values"] for r in runs] == [{"train.learning_rate": lr, "concept.preset": c}
                                           for lr in LRS for c in ("toy_smiley", "toy_striped")]
    assert all(r["train"]["program"] == 0 and r["train"]["runs_in_program"] == 4 for r in runs)
    assert all(r["train"]["mesh"] == {"runs": 4, "data": 2} for r in runs)
    # One anchor set per concept in the shared store, whichever rate.
    assert len({r["anchors"] for r in runs}) == 2
    assert sorted(p.name for p in (root / "anchors").iterdir()) == sorted({Path(r["anchors"]).name for r in runs})
    assert json.loads((root / "sweep.json").read_text())["runs"][3]["name"] == runs[3]["name"]
    assert all((Path(r["workdir"]) / "config.json").exists() for r in runs)

    r = runs[3]  # striped at the second rate
    config = xattn.get_config(f"{TINY},train.learning_rate={LRS[1]},concept=toy_striped,"
                              f"anchors.store={root / 'anchors'}")
    train.run(config, tmp_path / "alone", pipeline=toy_pipe, progress=False)
    alone, base = _trained(config, tmp_path / "alone", toy_pipe)
    swept, _ = _trained(config, r["workdir"], toy_pipe)
    # Float rounding only: the sweep lays 4 rows per device where the run alone lays 1, and Adam's
    # first steps (an update ~ the sign of the gradient) magnify rounding: a run alone on 1 and on 2
    # devices differs by 6e-5 after one step and by 2e-5 after eight (docs/sweeps.md).
    assert _relative_error(alone, swept, base) < 5e-5
    # ...while two runs of one concept at different rates differ in earnest.
    a, base = _trained(xattn.get_config(f"{TINY},train.learning_rate={LRS[0]},anchors.store={root / 'anchors'}"),
                       runs[0]["workdir"], toy_pipe)
    c, _ = _trained(xattn.get_config(f"{TINY},train.learning_rate={LRS[1]},anchors.store={root / 'anchors'}"),
                    runs[2]["workdir"], toy_pipe)
    assert _relative_error(a, c, base) > 0.1


def test_a_sweep_resumes_each_run_from_its_own_checkpoint(grid, tmp_path, toy_pipe):
    """One run loses its last checkpoint and trains again from the one before, alone in the step while
    the others, finished, pass through it unchanged, to the same parameters."""
    root = tmp_path / "grid"
    shutil.copytree(grid[0], root)
    run0 = root / grid[1]["runs"][0]["name"]
    config0 = xattn.get_config(f"{TINY},train.learning_rate={LRS[0]},anchors.store={root / 'anchors'}")
    before, base = _trained(config0, run0, toy_pipe)
    shutil.rmtree(run0 / "checkpoints" / "8")
    assert checkpointing.manager(run0).latest_step() == 6

    again = sweep.run(xattn.get_config(TINY), GRID, root, pipeline=toy_pipe, progress=False)
    assert [r["train"]["skipped"] for r in again["runs"]] == [False, True, True, True]
    after, _ = _trained(config0, run0, toy_pipe)
    assert checkpointing.manager(run0).latest_step() == 8
    assert _relative_error(before, after, base) < 1e-6


def test_a_sweep_stops_each_run_at_its_own_step_count_and_evaluates_each(tmp_path, toy_pipe, monkeypatch):
    # The grid's program (four runs, batches of their own): compiled once for both tests.
    arg = TINY.replace("eval.enabled=False", EVAL)
    root = tmp_path / "steps"
    calls = []
    draw = evaluate._draw
    monkeypatch.setattr(evaluate, "_draw", lambda *a, **k: calls.append(a[2]) or draw(*a, **k))
    result = sweep.run(xattn.get_config(arg), ["train.steps=4,6", GRID[1]], root, pipeline=toy_pipe, progress=False)
    # Each set's base images are drawn once for the two runs of its concept (one call per set and model).
    sets = {c: len(r["sets"]) for r in result["runs"] for c in [r["values"]["concept.preset"]]}
    assert len(calls) == sum(3 * n for n in sets.values())
    assert [checkpointing.manager(r["workdir"]).latest_step() for r in result["runs"]] == [4, 4, 6, 6]
    for r in result["runs"]:
        report = json.loads((Path(r["workdir"]) / "eval" / "report.json").read_text())
        assert r["sets"] and set(r["sets"]) == set(report["sets"])
        assert all(r["sets"][k]["ablated"] == report["sets"][k]["clip_accuracy"]["ablated"] for k in r["sets"])
    table = (root / "sweep.md").read_text()
    assert table.splitlines()[0].startswith("| run | steps | preset |") and table.count("\n| 0") == 4


def test_a_diverging_run_stops_without_saving_while_the_others_finish(tmp_path, toy_pipe):
    # The grid's program again: rates are values in the program, so 1e4 changes nothing compiled.
    result = sweep.run(xattn.get_config(TINY), ["train.learning_rate=3e-4,1e4", GRID[1]], tmp_path / "d",
                       pipeline=toy_pipe, progress=False)
    runs = result["runs"]
    assert ["failed" in r["train"] for r in runs] == [False, False, True, True]
    assert [checkpointing.manager(r["workdir"]).latest_step() for r in runs[:2]] == [8, 8]
    for r in runs[2:]:
        # Stopped at the first save (or log) that saw it, with nothing saved from then on.
        assert "stopped without saving" in r["train"]["failed"] and "sets" not in r
        last = checkpointing.manager(r["workdir"]).latest_step()
        assert last is None or last < 8
        assert f"(last good checkpoint: {'none' if last is None else f'step {last}'})" in r["train"]["failed"]
    assert "failed: " in sweep.format_table(result)


def test_runs_differing_in_what_the_step_is_built_from_train_in_programs_of_their_own(tmp_path, toy_pipe):
    members = sweep.plan(xattn.get_config(TINY), ["preserve.weight=0,2", "train.learning_rate=1e-4,1e-3"],
                         tmp_path / "w", model_loaded=True)
    selections = [checkpointing.selection_for(m.config, toy_pipe, m.spec.concept) for m in members]
    # Which loss terms exist is part of the program; a weight's value and the rate are not.
    assert sweep.programs(members, selections, toy_pipe) == [[0, 1], [2, 3]]
    assert sweep.data_key(members[0]) == sweep.data_key(members[1]) != sweep.data_key(members[2])


def test_sweep_axes_are_checked_before_anything_runs(tmp_path):
    config = xattn.get_config(TINY)
    for axes, words in [
        ([], "at least one --sweep"),
        (["train.learning_rate"], "KEY=VALUE1"),
        (["train.learning_rate=1e-4,1e-4"], "repeats"),
        (["model=toy,other"], "cannot be swept"),
        (["train.steps=4", "train.steps=8"], "swept twice"),
        (["train.no_such_key=1,2"], "unknown config key"),
        (["train.steps=four"], "an integer"),
        (["concept=toy_smiley,no_such_preset"], "run 01"),
    ]:
        with pytest.raises(sweep.SweepError, match=words):
            sweep.plan(config, axes, tmp_path / "s", model_loaded=True)
    with pytest.raises(sweep.SweepError, match="mesh.fsdp=2"):
        sweep.plan(xattn.get_config(TINY + ",mesh.fsdp=2"), ["train.steps=4,8"], tmp_path / "s", model_loaded=True)
    assert not (tmp_path / "s").exists()
    with pytest.raises(sweep.SweepError, match="runs_axis=3"):
        sweep.runs_axis(4, 8, 8, requested=3)
    assert sweep.runs_axis(4, 8, 8) == 4 and sweep.runs_axis(3, 8, 8) == 1 and sweep.runs_axis(6, 8, 8) == 2


def test_the_anchor_store_draws_a_set_once_for_every_run_that_needs_it(tmp_path, toy_pipe):
    store = tmp_path / "store"
    arg = f"{TINY},anchors.store={store}"
    first = anchors.generate_anchors(xattn.get_config(arg), tmp_path / "a", pipeline=toy_pipe, progress=False)
    again = anchors.generate_anchors(xattn.get_config(arg + ",train.learning_rate=1e-2"), tmp_path / "b",
                                     pipeline=toy_pipe, progress=False)
    assert first["generated"] == 16 and again["generated"] == 0 and first["path"] == again["path"]
    assert not (tmp_path / "a" / "anchors").exists() and not (tmp_path / "b" / "anchors").exists()
    other = anchors.generate_anchors(xattn.get_config(arg + ",seed=1"), tmp_path / "c", pipeline=toy_pipe,
                                     progress=False)
    assert other["generated"] == 16 and other["path"] != first["path"]
    assert len(list(store.iterdir())) == 2


def test_a_sweep_over_two_processes_trains_one_run_per_process(grid, tmp_path, toy_pipe):
    """``python -m ablate_jax.sweep`` as 2 processes of 4 devices: the runs axis spans the processes
    (one run's devices per process), and each run equals the same run of the one-process grid."""
    logs = tmp_path / "logs"
    logs.mkdir()
    arg = f"{TINY},anchors.store={grid[0] / 'anchors'}"  # the grid's anchors: the processes draw none
    workdir = tmp_path / "two"
    codes = wait(launch(workdir, arg, logs, module="ablate_jax.sweep", extra=(f"--sweep={GRID[0]}",)), timeout=600)
    out = {pid: (logs / f"process{pid}.log").read_text() for pid in range(PROCESSES)}
    assert codes == [0] * PROCESSES, "\n".join(f"--- process {p} ---\n{t[-3000:]}" for p, t in out.items())
    result = json.loads((workdir / "sweep.json").read_text())
    assert [r["train"]["mesh"] for r in result["runs"]] == [{"runs": 2, "data": 4}] * 2
    assert "| 01 | 1e-3 |" in out[0] and "anchors already complete" in out[0]
    config = xattn.get_config(f"{TINY},train.learning_rate={LRS[1]},anchors.store={grid[0] / 'anchors'}")
    swept_here, base = _trained(config, grid[1]["runs"][2]["workdir"], toy_pipe)
    swept_there, _ = _trained(config, result["runs"][1]["workdir"], toy_pipe)
    assert _relative_error(swept_here, swept_there, base) < 5e-5


def test_a_larger_count_extends_a_set_of_the_store_and_a_smaller_one_reads_its_first_images(tmp_path, toy_pipe):
    def config(n, store):
        return xattn.get_config(f"{TINY},anchors.num_images={n},anchors.store={store}")

    def draw(n, name, store=tmp_path / "store"):
        return anchors.generate_anchors(config(n, store), tmp_path / name, pipeline=toy_pipe, progress=False)

    def records(n, name, store=tmp_path / "store"):
        return list(anchor_store.open_anchors(open_workdir(config(n, store), tmp_path / name)))

    assert draw(12, "a")["generated"] == 12  # shards of 8: one whole, one of 4
    extended = draw(16, "b")
    # The whole shard is kept; the partial one is drawn again, whole.
    assert extended["generated"] == 8 and extended["resumed_shards"] == 1
    assert len(list((tmp_path / "store").iterdir())) == 1
    assert draw(16, "c", tmp_path / "other")["generated"] == 16
    grown, direct = records(16, "b"), records(16, "c", tmp_path / "other")
    assert [r["index"] for r in grown] == list(range(16))
    assert all(np.array_equal(g["image"], d["image"]) and g["prompt"] == d["prompt"] for g, d in zip(grown, direct, strict=True))

    part = draw(12, "d")
    assert part["generated"] == 0 and "reads its first 12" in part["message"]
    first = records(12, "d")
    assert [r["index"] for r in first] == list(range(12))
    assert all(np.array_equal(f["image"], g["image"]) for f, g in zip(first, grown[:12], strict=True))
