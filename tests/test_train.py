"""Training on the toy world: small runs end to end, resumption, the embedding group, and refusals
(the default config's whole job is in test_demo.py)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ablate_jax import checkpointing, train
from ablate_jax.config import ConfigError, prepare, resolve
from ablate_jax.toy import shipped_path
from ablate_jax.workdir import open_workdir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import embedding  # noqa: E402
import xattn  # noqa: E402

# A run small enough to train twice in a test: a few anchors, a few steps, no evaluation or export.
TINY = ("anchors.num_images=16,anchors.steps=3,anchors.shard_size=8,train.steps=8,train.checkpoint_every=2,"
        "train.log_every=2,preserve.weight=0,eval.enabled=False,export.enabled=False")


def _env(**extra):
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(workdir, arg, *flags, env=None, step_delay=0.0):
    # With a delay, the command runs through tests/slow.py, which pauses after each train step.
    runner = [str(ROOT / "tests" / "slow.py"), f"--step_delay={step_delay}"] if step_delay else ["-m"]
    cmd = [sys.executable, *runner, "ablate_jax.train", f"--config={ROOT / 'configs' / 'xattn.py'}:{arg}",
           f"--workdir={workdir}", *flags]
    return cmd, env or _env()


def _trained(config, workdir, pipe):
    wd = open_workdir(config, workdir)
    sel = checkpointing.selection_for(wd.spec.config, pipe, wd.spec.concepts)
    return sel.split(checkpointing.restore_ablated_params(wd, pipe, sel))


def _trained_base(config, pipe):
    """The pretrained values of what ``config`` trains."""
    spec = prepare(config)
    return checkpointing.selection_for(spec.config, pipe, spec.concepts).split(pipe.params)


@pytest.fixture(scope="module")
def tiny_anchors(tmp_path_factory, toy_pipe):
    """Anchors of the tiny config, generated once and copied into each test's workdir."""
    from ablate_jax import anchors

    workdir = tmp_path_factory.mktemp("tiny") / "w"
    anchors.generate_anchors(xattn.get_config(TINY), workdir, pipeline=toy_pipe, progress=False)
    return workdir / "anchors"


def _workdir_with_anchors(tmp_path, tiny_anchors, name):
    workdir = tmp_path / name
    shutil.copytree(tiny_anchors, workdir / "anchors")
    return workdir


def test_a_killed_run_resumes_to_the_same_parameters(tmp_path, tiny_anchors, toy_pipe):
    straight = _workdir_with_anchors(tmp_path, tiny_anchors, "straight")
    train.run(xattn.get_config(TINY), straight, pipeline=toy_pipe, progress=False)

    killed = _workdir_with_anchors(tmp_path, tiny_anchors, "killed")
    cmd, env = _cli(killed, TINY, step_delay=1.0)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            finished = [p for p in (killed / "checkpoints").glob("*") if p.name.isdigit()]
            if any(int(p.name) >= 2 for p in finished):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = checkpointing.manager(killed).latest_step()
    assert partial is not None and partial < 8
    summary = train.run(xattn.get_config(TINY), killed, pipeline=toy_pipe, progress=False)["train"]
    assert not summary["skipped"]

    a, b = _trained(xattn.get_config(TINY), straight, toy_pipe), _trained(xattn.get_config(TINY), killed, toy_pipe)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.slow  # the optimizer-level check is in test_params.py; this is the same through a whole run
def test_embedding_run_moves_only_target_rows(tmp_path, tiny_anchors):
    from ablate_jax.models import load_pipeline

    workdir = _workdir_with_anchors(tmp_path, tiny_anchors, "emb")
    config = embedding.get_config(TINY + ",train.learning_rate=1e-2")
    train.run(config, workdir, progress=False)
    pipe = load_pipeline(shipped_path("pipeline"))
    params = checkpointing.restore_ablated_params(open_workdir(config, workdir), pipe)
    path = ("text_encoder", "text_model", "embeddings", "token_embedding", "embedding")
    before, after = pipe.params, params
    for p in path:
        before, after = before[p], after[p]
    before, after = np.asarray(before), np.asarray(after)
    changed = np.flatnonzero(np.any(before != after, axis=1))
    from ablate_jax.params import target_token_ids

    assert set(changed) == set(target_token_ids(pipe.tokenizer, ["smiley"], "circle"))
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), params["unet"], pipe.params["unet"]))


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, tiny_anchors, toy_pipe):
    workdir = _workdir_with_anchors(tmp_path, tiny_anchors, "nan")
    with pytest.raises(train.TrainError, match="NaN or infinite"):
        train.run(xattn.get_config(TINY + ",train.learning_rate=1e38"), workdir, pipeline=toy_pipe, progress=False)
    step = checkpointing.manager(workdir).latest_step()
    assert step is None or step < 8


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        ("train.steps=0", "train.steps must be a positive integer"),
        ("train.steps=-3", "train.steps must be a positive integer"),
        ("model=/nonexistent/model", "nonexistent"),
        ("concept.anchor=hexagon", "appears in none"),
    ],
)
def test_bad_input_fails_before_writing_anything(tmp_path, arg, match):
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=match):
        train.run(xattn.get_config(arg), workdir, progress=False)
    assert not workdir.exists()


def test_unknown_config_key_is_refused():
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        xattn.get_config("train.stepz=3")


def test_the_loss_picks_the_toy_preservation_weight_and_an_explicit_weight_wins():
    weight = lambda arg: resolve(xattn.get_config(arg)).preserve.weight  # noqa: E731
    assert weight("") == 4.0
    assert weight("loss=noise_based") == 1.0
    assert weight("preserve.weight=2,loss=noise_based") == 2.0
    assert weight("loss=noise_based,model=/data/sd") == 0.0  # real models: none by default
    with pytest.raises(ConfigError, match="loss must be one of model_based, noise_based, got 'kl'"):
        resolve(xattn.get_config("loss=kl"))


def test_a_toy_world_folder_gets_the_toy_settings_and_any_other_folder_sd_ones(tmp_path):
    from ablate_jax import toy

    marked, plain = tmp_path / "retrained_toy", tmp_path / "other"
    marked.mkdir(), plain.mkdir()
    toy.write_marker(marked)
    assert toy.is_toy_world(str(toy.shipped_path("pipeline"))) and toy.is_toy_world(str(toy.shipped_path("clip")))
    shipped, retrained = resolve(xattn.get_config()), resolve(xattn.get_config(f"model={marked}"))
    other = resolve(xattn.get_config(f"model={plain}"))
    for key in ("train.learning_rate", "train.steps", "anchors.num_images", "preserve.weight", "eval.clip"):
        section, field = key.split(".")
        assert retrained[section][field] == shipped[section][field], key
    assert (other.train.learning_rate, other.train.steps, other.anchors.num_images, other.preserve.weight,
            other.eval.clip) == (1.6e-5, 200, 1000, 0.0, "openai/clip-vit-large-patch14")
    assert not toy.is_toy_world("gs://bucket/model") and not toy.is_toy_world("CompVis/stable-diffusion-v1-4")


def test_preserve_concepts_come_from_the_preset_and_relabel_the_report_sets():
    from ablate_jax.config import concept_from_config  # noqa: PLC0415

    roles = lambda c: {s.name: s.role for s in c.eval_sets}  # noqa: E731
    preset = concept_from_config(xattn.get_config())
    assert preset.preserve == ("frowny", "winky")
    assert roles(preset)["frowny"] == roles(preset)["winky"] == "preserved" and roles(preset)["gaspy"] == "surrounding"

    # Preserving the frowny alone turns the winky's report set into a held-out one; naming gaspy
    # instead does the reverse for the frowny.
    one = concept_from_config(xattn.get_config("preserve.concepts=frowny"))
    assert one.preserve == ("frowny",)
    assert roles(one)["winky"] == "surrounding" and roles(one)["gaspy"] == "surrounding"
    other = concept_from_config(xattn.get_config("preserve.concepts=gaspy"))
    assert roles(other)["frowny"] == "surrounding" and roles(other)["gaspy"] == "preserved"
    # Style sets are judged as "dotted background" but named, and preserved, as "dotted".
    style = concept_from_config(xattn.get_config("concept=toy_striped,preserve.concepts=dotted;wavy"))
    assert style.preserve == ("dotted", "wavy")
    assert roles(style)["dotted"] == roles(style)["wavy"] == "preserved" and roles(style)["checkered"] == "surrounding"


def test_pickled_model_is_refused(tmp_path):
    from ablate_jax.toy import shipped_path

    model = tmp_path / "model"
    shutil.copytree(shipped_path("pipeline"), model)
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match="pickled"):
        train.run(xattn.get_config(f"model={model}"), workdir, progress=False)
    assert not workdir.exists()


def test_cli_reports_bad_input_in_one_line(tmp_path):
    cmd, env = _cli(tmp_path / "w", "train.steps=0")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: train.steps must be a positive integer, got 0"]
    assert not (tmp_path / "w").exists()


def test_chunked_encoding_and_a_16_bit_frozen_base_compute_the_same_objective(toy_pipe):
    """The two memory savings of the train step change no value: the VAE encoding in chunks, and the
    frozen base held in the compute dtype (the modules cast it there at every use anyway)."""
    import jax.numpy as jnp

    from ablate_jax import losses
    from ablate_jax import params as params_lib
    from ablate_jax.models import load_pipeline
    from ablate_jax.text_to_image import tokenize

    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32), "mask": np.ones((8, 8, 8, 1), np.float32),
             "target_ids": tokenize(toy_pipe, ["a red smiley"] * 8), "anchor_ids": tokenize(toy_pipe, ["a red circle"] * 8)}
    loss_cfg = losses.LossConfig(loss="model_based", teacher="frozen")
    key = jax.random.key(3)
    values = {}
    for name, pipe, chunks, cast in (("plain", toy_pipe, 1, False), ("chunked", toy_pipe, 4, False),
                                     ("bf16", load_pipeline(shipped_path("pipeline"), dtype=jnp.bfloat16), 1, False),
                                     ("bf16 frozen in bf16", load_pipeline(shipped_path("pipeline"), dtype=jnp.bfloat16), 1, True)):
        sel = params_lib.selection(pipe.params, "xattn_kv")
        objective = train.make_objective(pipe, sel, loss_cfg, encode_chunks=chunks)
        base = params_lib.frozen_for_compute(pipe.params, jnp.bfloat16) if cast else pipe.params
        if cast:
            assert base["unet"]["conv_in"]["kernel"].dtype == jnp.bfloat16
            assert base["unet"]["conv_in"]["bias"].dtype == jnp.float32  # vectors stay as they are
        values[name] = float(jax.jit(objective)(sel.split(pipe.params), base, batch, key)[0])
    assert values["chunked"] == pytest.approx(values["plain"], rel=1e-6)
    assert values["bf16 frozen in bf16"] == values["bf16"]
    assert values["bf16"] == pytest.approx(values["plain"], rel=0.1)  # a bfloat16 model, not another one


def test_a_run_builds_its_concept_once_guards_its_workdir_once_and_restores_once(tmp_path, tiny_anchors, toy_pipe,
                                                                                monkeypatch):
    # The stages share what run() made: one concept, one workdir guard, one restore of the
    # trained parameters for both evaluation and export.
    import collections

    from ablate_jax import config as config_lib
    from ablate_jax import workdir as workdir_lib

    calls = collections.Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(config_lib, "concept_from_config", counted("concept", config_lib.concept_from_config))
    monkeypatch.setattr(workdir_lib.Workdir, "guard", counted("guard", workdir_lib.Workdir.guard))
    monkeypatch.setattr(checkpointing, "restore", counted("restore", checkpointing.restore))
    workdir = _workdir_with_anchors(tmp_path, tiny_anchors, "once")
    config = xattn.get_config(TINY + ",eval.enabled=True,eval.num_images=2,eval.steps=2,eval.sets=smiley,"
                              "export.enabled=True")
    report = train.run(config, workdir, pipeline=toy_pipe, progress=False)
    assert list(report["sets"]) == ["smiley"] and (workdir / "export" / "delta.safetensors").exists()
    assert report["anchors"]["skipped"] and report["train"]["steps"] == 8
    assert calls == {"concept": 1, "guard": 1, "restore": 1}, calls


def test_the_adversary_finds_a_prompt_the_ablation_term_is_worse_on_and_stays_within_its_bound(toy_pipe):
    # Gradient ascent on the target word's embedding: the term under the perturbed prompt exceeds the
    # plain one; with a vanishing bound the two agree.
    from ablate_jax import losses
    from ablate_jax import params as params_lib
    from ablate_jax.text_to_image import tokenize

    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32), "mask": np.ones((4, 8, 8, 1), np.float32),
             "target_ids": tokenize(toy_pipe, ["a red smiley"] * 4), "anchor_ids": tokenize(toy_pipe, ["a red circle"] * 4)}
    sel = params_lib.selection(toy_pipe.params, "xattn_kv")
    cfg = losses.LossConfig(loss="model_based", adversarial_weight=1.0)
    rows = tuple(params_lib.target_token_ids(toy_pipe.tokenizer, ("smiley",), "circle"))

    # One ascent step (the unrolled loop is what compilation time grows with), and the bound an
    # argument of one compiled program.
    @jax.jit
    def terms_at(epsilon):
        objective = train.make_objective(toy_pipe, sel, cfg, adversary=train.Adversary(rows, epsilon, 1))
        return objective(sel.split(toy_pipe.params), toy_pipe.params, batch, jax.random.key(0))[1]

    terms = {epsilon: terms_at(epsilon) for epsilon in (1e-6, 0.5)}
    assert float(terms[1e-6]["adversarial"]) == pytest.approx(float(terms[1e-6]["ablation"]), rel=1e-3)
    assert float(terms[0.5]["adversarial"]) > 1.5 * float(terms[0.5]["ablation"])
    assert float(terms[0.5]["ablation"]) == pytest.approx(float(terms[1e-6]["ablation"]), rel=1e-6)


def test_a_run_of_several_concepts_removes_each_into_one_report_and_one_export(tmp_path, toy_pipe):
    # The tiny run's settings (its compiled programs serve), with three concepts: anchors per concept into
    # one store, batches across them, each concept's set and attacks in one report, one export.
    import json

    from ablate_jax import anchors

    store = tmp_path / "store"
    config = xattn.get_config(TINY + ",concepts=toy_smiley;toy_striped;toy_memorized,train.steps=2,"
                              "eval.enabled=True,eval.num_images=2,eval.steps=2,export.enabled=True,"
                              "eval.sets=smiley.smiley;striped.striped;memorized.memorized,eval.attacks=misspelling,"
                              f"anchors.store={store}")
    out = train.run(config, tmp_path / "run", pipeline=toy_pipe, progress=False)
    assert set(out["anchors"]["parts"]) == {"smiley", "striped", "memorized"}
    assert out["anchors"]["num_images"] == 48 and len(list(store.iterdir())) == 3
    assert list(out["sets"]) == ["smiley.smiley", "striped.striped", "memorized.memorized"]
    assert {s["group"] for s in out["sets"].values()} == {"smiley", "striped", "memorized"}
    assert set(out["memorization"]) == {"memorized"}
    # Each concept's attacks, against its own target, named like its sets.
    assert {a["group"] for a in out["attacks"].values()} == {"smiley", "striped", "memorized"}
    assert "smiley.misspelling_doubled" in out["attacks"] and "striped.misspelling_doubled" in out["attacks"]
    written = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert [c["label"] for c in written["concepts"]] == ["smiley", "striped", "memorized"]
    assert (tmp_path / "run" / "eval" / "striped.striped.png").exists()
    record = json.loads((tmp_path / "run" / "export" / "export.json").read_text())
    assert [c["targets"][0] for c in record["concept"]["concepts"]][:2] == ["smiley", "striped"]
    # The same concept removed alone finds its anchors in the store and draws none.
    alone = anchors.generate_anchors(xattn.get_config(TINY + f",concept=toy_striped,anchors.store={store}"),
                                     tmp_path / "alone", pipeline=toy_pipe, progress=False)
    assert alone["skipped"] and alone["generated"] == 0
    # The one delta moved.
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         _trained(config, tmp_path / "run", toy_pipe), _trained_base(config, toy_pipe))
    assert max(jax.tree.leaves(moved)) > 0
