"""Evaluation: CLIP score and accuracy against transformers, KID against a plain formula, and the
report of a tiny toy run (schema, grids, report.md, base-only and memorization runs, the CLI)."""

import copy
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from ablate_jax import clip_features, evaluate
from ablate_jax import report as report_lib
from ablate_jax.concepts import ROLES, EvalSet
from ablate_jax.config import base_config
from ablate_jax.models import load_clip, load_pipeline
from ablate_jax.toy import shipped_path


def test_clip_score_and_accuracy_match_transformers(tmp_path):
    from tiny_models import save_tiny_clip
    from transformers import CLIPTokenizer

    ref = save_tiny_clip(tmp_path)
    clip = load_clip(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    texts = [evaluate.concept_text(c) for c in ("grumpy cat", "cat")]

    ours = evaluate.clip_scores(clip_features.image_embeddings(clip, images), clip_features.text_embeddings(clip, texts))

    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = torch.from_numpy(tok(texts, padding="max_length", max_length=77, return_tensors="np").input_ids).long()
    mean, std = np.array(clip.image_mean, np.float32), np.array(clip.image_std, np.float32)
    pixels = torch.from_numpy(((images / 255.0 - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        t = ref.get_text_features(input_ids=ids)
        i = ref.get_image_features(pixel_values=pixels)
    t, i = (getattr(x, "pooler_output", x) for x in (t, i))
    t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
    theirs = 2.5 * torch.clamp(i @ t.T, min=0).numpy()

    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    emb_i, emb_t = clip_features.image_embeddings(clip, images), clip_features.text_embeddings(clip, texts)
    assert evaluate.clip_accuracy(emb_i, emb_t[0], emb_t[1]) == float(np.mean(theirs[:, 0] > theirs[:, 1]))


def _kid_plain(x, y):
    """The unbiased MMD^2 with kernel (x.y/d + 1)^3, written out with loops over pairs."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_the_plain_formula():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.5
    # One subset holding every row: exactly the formula.
    assert np.isclose(evaluate.kid(x, y, subsets=1, subset_size=12), _kid_plain(x, y), rtol=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 16)), rng.standard_normal((300, 16))
    c = rng.standard_normal((300, 16)) * 1.5 + 0.5
    same, different = evaluate.kid(a, b), evaluate.kid(a, c)
    assert abs(same) < 0.01 and different > 0.1, (same, different)


def _kid_paired_plain(x, y):
    """The paired estimator written out: cross pairs (i, i) of one seed are left out."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    return sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i]) for i, j in pairs) / len(pairs)


def test_paired_kid_equals_its_formula_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 5))
    y = x + 0.3 * rng.standard_normal((10, 5))
    assert np.isclose(evaluate.kid(x, y, paired=True), _kid_paired_plain(x, y), rtol=1e-10)
    assert evaluate.kid(x, x, paired=True) == 0.0
    # The unpaired estimate of a set against itself is biased below zero; the paired one is not.
    big = rng.standard_normal((300, 16))
    assert evaluate.kid(big, big) < 0 and evaluate.kid(big, big, subset_size=50, paired=True) == 0.0
    assert evaluate.kid(big, big * 1.5 + 0.5, subset_size=50, paired=True) > 0.1


# ------------------------------------------------------------------------------------------------ a toy run

N = 8  # images per set: one batch over the 8 virtual devices, so one compiled sampler serves every test
TOY_TILE = 96  # 32-pixel toy images, enlarged 3x in the grids


def _config(preset: str, sets: str):
    c = base_config()
    c.concept.preset = preset
    c.eval.num_images, c.eval.steps, c.eval.sets = N, 2, sets
    c.lock()
    return c


@pytest.fixture(scope="module")
def toy():
    # Shared, so that every test reuses the compiled programs (they are cached per pipeline and CLIP).
    return load_pipeline(shipped_path("pipeline")), load_clip(shipped_path("clip"))


def _perturbed(params, scale=0.5, seed=0):
    """The params with noise on every cross-attention key/value kernel (what an ablation trains)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params["unet"])
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        if "attn2" in name and ("to_k" in name or "to_v" in name):
            x = np.asarray(x) + scale * np.std(x) * rng.standard_normal(x.shape).astype(np.float32)
        out.append(x)
    return {**params, "unet": jax.tree_util.tree_unflatten(tree, out)}


MISSPELLING = EvalSet("smiley_misspelled", "target_paraphrase", "smiley",
                      ("a red smilee on a plain background", "a blue smiely", "a smilye on a striped background"))


@pytest.fixture(scope="module")
def perturbed_run(toy, tmp_path_factory):
    pipe, clip = toy
    workdir = tmp_path_factory.mktemp("perturbed")
    report = evaluate.evaluate_run(_config("toy_smiley", "smiley;circle;frowny"), workdir,
                                   ablated_params=_perturbed(pipe.params), pipeline=pipe, clip=clip,
                                   progress=False, extra_sets=[MISSPELLING])
    return report, workdir


def _assert_schema(report, base_only):
    """The report schema of DESIGN.md section 3, checked without the package's own checker."""
    assert {"concept", "sets", "timing_s"} <= set(report)
    assert {"kind", "targets", "anchor"} <= set(report["concept"])
    assert report["timing_s"]["eval"] > 0
    for name, s in report["sets"].items():
        assert s["role"] in ROLES, name
        assert isinstance(s["concept"], str) and s["n_images"] == N
        for measure in ("clip_score", "clip_accuracy") + (("anchor_rate",) if s["role"].startswith("target") else ()):
            assert set(s[measure]) == {"base", "ablated"}, (name, measure)
            assert isinstance(s[measure]["base"], float)
            if base_only:
                assert s[measure]["ablated"] is None
            else:
                assert isinstance(s[measure]["ablated"], float)
        for model in ("base",) if base_only else ("base", "ablated"):
            assert 0.0 <= s["clip_accuracy"][model] <= 1.0 and 0.0 <= s["clip_score"][model] <= 2.5
        assert (s["kid"] is None) if base_only else isinstance(s["kid"], float)
    report_lib.check_report(report)


def _grid_size(report, name, sides, columns=4):
    s = report["sets"][name]
    prompts = evaluate.set_prompts(next(e for e in _sets(report) if e.name == name), s["n_images"])
    rows = report_lib.grid_rows(prompts, columns)
    return report_lib.grid_size(len(rows), max(len(i) for _, i in rows), TOY_TILE, sides)


def _sets(report):
    from ablate_jax.families import preset

    return (*preset(report["concept"]["preset"]).eval_sets, MISSPELLING)


def test_report_of_a_toy_run(perturbed_run):
    report, workdir = perturbed_run
    _assert_schema(report, base_only=False)
    assert list(report["sets"]) == ["smiley", "circle", "frowny", "smiley_misspelled"]
    assert [s["role"] for s in report["sets"].values()] == ["target", "anchor", "preserved", "target_paraphrase"]
    assert "memorization" not in report
    # The perturbation shows: the ablated images differ from the base ones of the same seeds.
    assert max(s["kid"] for s in report["sets"].values()) > 1e-4

    eval_dir = workdir / "eval"
    assert json.loads((eval_dir / "report.json").read_text()) == report
    assert sorted(p.name for p in workdir.iterdir()) == ["eval"]  # no staging folder left behind
    md = (eval_dir / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(report["sets"])
    for name, s in report["sets"].items():
        row = next(ln for ln in table if ln.startswith(f"| {name} |"))
        assert f"| {s['role']} |" in row and f"{s['kid']:.5f}" in row
        with Image.open(eval_dir / f"{name}.png") as im:
            assert im.size == _grid_size(report, name, sides=2), name
    assert "KID" in evaluate.format_table(report).splitlines()[0]


def test_identical_params_give_identical_measures_and_zero_kid(toy, perturbed_run, tmp_path):
    pipe, clip = toy
    report = evaluate.evaluate_run(_config("toy_smiley", "smiley;circle"), tmp_path, ablated_params=pipe.params,
                                   pipeline=pipe, clip=clip, progress=False)
    _assert_schema(report, base_only=False)
    for name, s in report["sets"].items():
        assert s["kid"] == 0.0, (name, s["kid"])  # same seeds, same images: the paired KID is exactly 0
        for measure in ("clip_score", "clip_accuracy", "anchor_rate"):
            if measure in s:
                assert s[measure]["base"] == s[measure]["ablated"], (name, measure)
        # Same seeds as the other run (a set's images depend on its name, not on the other sets).
        assert s["clip_score"]["base"] == perturbed_run[0]["sets"][name]["clip_score"]["base"]
    # "Anchor beats target" and "target beats anchor" exclude each other (both can fail on a tie at 0).
    target = report["sets"]["smiley"]
    assert target["anchor_rate"]["base"] + target["clip_accuracy"]["base"] <= 1.0


def test_memorization_block(toy, tmp_path):
    from ablate_jax.toy import world

    pipe, clip = toy
    report = evaluate.evaluate_run(_config("toy_memorized", "memorized;orange_star"), tmp_path,
                                   ablated_params=_perturbed(pipe.params), pipeline=pipe, clip=clip, progress=False)
    _assert_schema(report, base_only=False)
    mem = report["memorization"]
    assert mem["method"] == "toy_world" and mem["threshold"] == world.MEMORIZATION_THRESHOLD
    assert mem["sets"] == ["memorized"] and mem["n_images"] == N
    for model in ("base", "ablated"):
        assert 0.0 <= mem["rate"][model] <= 1.0 and 0.0 <= mem["similarity"][model] <= 1.0
    assert "Memorization:" in (tmp_path / "eval" / "report.md").read_text()
    # One distinct prompt: its 8 images fill two rows of 4 per side.
    with Image.open(tmp_path / "eval" / "memorized.png") as im:
        assert im.size == report_lib.grid_size(2, 4, TOY_TILE, 2)


def test_base_only_from_the_command_line(toy, tmp_path, monkeypatch, capsys):
    pipe, clip = toy
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: pipe)
    monkeypatch.setattr(evaluate, "load_clip", lambda *a, **k: clip)
    rc = evaluate.main(["evaluate", "--config=configs/xattn.py:concept=toy_memorized", f"--workdir={tmp_path}",
                        "--base_only", "--noprogress", f"--config.eval.num_images={N}", "--config.eval.steps=2",
                        "--config.eval.sets=memorized;star"])
    assert rc == 0, capsys.readouterr().err
    assert "CLIP score (base)" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    _assert_schema(report, base_only=True)
    assert report["settings"]["base_only"] is True
    assert report["memorization"]["rate"]["ablated"] is None
    with Image.open(tmp_path / "eval" / "star.png") as im:
        assert im.size == _grid_size(report, "star", sides=1)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/xattn.py", "--base_only"], "--workdir is required"),
    (["--config=configs/xattn.py", "--config.eval.sets=nope", "--base_only"], "eval.sets names 'nope'"),
    (["--config=configs/xattn.py:nope=1", "--base_only"], "unknown config key 'nope'"),
    (["--config=configs/missing.py", "--base_only"], "does not exist"),
])
def test_command_line_errors_are_one_line(args, message, tmp_path, capsys):
    workdir = [f"--workdir={tmp_path / 'run'}"] if "workdir" not in message else []
    assert evaluate.main(["evaluate", *args, *workdir]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_evaluate_run_needs_ablated_params_unless_base_only(tmp_path):
    with pytest.raises(evaluate.EvalError, match="ablated"):
        evaluate.evaluate_run(_config("toy_smiley", "smiley"), tmp_path)


def test_check_report_rejects_what_the_schema_forbids(perturbed_run):
    good = perturbed_run[0]
    report_lib.check_report(good)
    for path, value in [(("sets", "smiley", "role"), "villain"), (("sets", "circle", "clip_accuracy", "ablated"), 1.5),
                        (("sets", "frowny", "kid"), None), (("sets", "smiley", "n_images"), 0)]:
        bad = copy.deepcopy(good)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(ValueError, match=path[1]):
            report_lib.check_report(bad)


def test_grid_puts_base_left_and_ablated_right():
    rng = np.random.default_rng(0)
    base, ablated = (rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    prompts = ["a red smiley", "a blue circle"] * 3  # images 0, 2, 4 share a prompt, as a cycled set does
    grid = np.asarray(report_lib.before_after_grid(base, ablated, prompts, columns=4))
    assert grid.shape[1::-1] == report_lib.grid_size(2, 3, TOY_TILE, 2)  # 2 prompts, 3 images each
    top = report_lib.PAD + report_lib.HEADER + report_lib.CAPTION
    block = 3 * TOY_TILE + 2 * report_lib.SPACE
    enlarged = lambda im: np.repeat(np.repeat(im, 3, axis=0), 3, axis=1)  # noqa: E731
    x1 = report_lib.PAD + TOY_TILE + report_lib.SPACE  # second tile of the row: image 2
    assert np.array_equal(grid[top : top + TOY_TILE, report_lib.PAD : report_lib.PAD + TOY_TILE], enlarged(base[0]))
    assert np.array_equal(grid[top : top + TOY_TILE, x1 : x1 + TOY_TILE], enlarged(base[2]))
    xa = report_lib.PAD + block + report_lib.GAP
    assert np.array_equal(grid[top : top + TOY_TILE, xa : xa + TOY_TILE], enlarged(ablated[0]))
