"""The method's effect on the toy world for each config other than the default (``make test-slow``).

Each fixture runs a whole job (anchors, training, evaluation) with the config's defaults; the
tests check the criteria its kind of concept is judged by. The default config's run is in
test_train.py and runs with ``make test``.
"""

import sys
from pathlib import Path

import pytest

from ablate_jax import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))

import embedding  # noqa: E402
import full  # noqa: E402
import robust  # noqa: E402
import xattn  # noqa: E402

pytestmark = pytest.mark.slow

NO_EXPORT = "export.enabled=False"
TOLERANCE = 0.05 + 1e-9  # one image in 20


def _acc(report, name):
    return report["sets"][name]["clip_accuracy"]


def _run(tmp_path_factory, config):
    return train.run(config, tmp_path_factory.mktemp("science") / "w", progress=False)


@pytest.fixture(scope="module")
def style_run(tmp_path_factory):
    return _run(tmp_path_factory, xattn.get_config(f"concept=toy_striped,{NO_EXPORT}"))


def test_style_ablation_turns_striped_backgrounds_plain(style_run):
    acc = _acc(style_run, "striped")
    assert acc["base"] >= 0.85 and acc["ablated"] <= 0.10
    assert style_run["sets"]["striped"]["anchor_rate"]["ablated"] >= 0.80
    plain = _acc(style_run, "plain")
    assert abs(plain["ablated"] - plain["base"]) <= TOLERANCE
    assert "striped_misspelled_doubled" in style_run["sets"]


@pytest.mark.xfail(strict=True, reason=(
    "on evaluation prompts that training never saw, the preserved dotted style loses 3 of its 20 images "
    "(0.95 -> 0.80; wavy 0.90 -> 0.95, checkered 1.00 -> 1.00). Preservation weight 8 or 16, 400 steps, and "
    "anchor prompts without 'plain dark/light' all left it at 0.75 to 0.85 and the stripes at 0.20 to 0.35"))
def test_style_ablation_keeps_the_other_backgrounds(style_run):
    for name in ("dotted", "checkered", "wavy"):
        acc = _acc(style_run, name)
        assert abs(acc["ablated"] - acc["base"]) <= TOLERANCE, (name, acc)


def test_memorized_image_is_no_longer_reproduced(tmp_path_factory):
    report = _run(tmp_path_factory, full.get_config(NO_EXPORT))
    rate = report["memorization"]["rate"]
    assert rate["base"] >= 0.85 and rate["ablated"] <= 0.10
    # The memorized caption now draws what its paraphrases draw: an orange star.
    assert report["sets"]["memorized"]["anchor_rate"]["ablated"] >= 0.80
    anchor = _acc(report, "orange_star")
    assert abs(anchor["ablated"] - anchor["base"]) <= TOLERANCE


def test_embedding_run_removes_the_target_and_nothing_else(tmp_path_factory):
    report = _run(tmp_path_factory, embedding.get_config(NO_EXPORT))
    acc = _acc(report, "smiley")
    assert acc["base"] >= 0.85 and acc["ablated"] <= 0.10
    # Only the target's token rows moved: prompts without it draw exactly what they drew before.
    misspelled = [n for n in report["sets"] if n.startswith("smiley_misspelled_")]
    assert len(misspelled) == 4
    for name in ("circle", "frowny", "winky", "gaspy", "star", "square", "smiley_paraphrase", *misspelled):
        assert report["sets"][name]["kid"] == 0.0, name
        assert _acc(report, name)["ablated"] == _acc(report, name)["base"], name


def test_noise_based_run_removes_the_target(tmp_path_factory):
    # The loss picks the toy world's preservation weight (1 here, 4 with the teacher's prediction).
    report = _run(tmp_path_factory, xattn.get_config(f"loss=noise_based,train.steps=600,{NO_EXPORT}"))
    acc = _acc(report, "smiley")
    assert acc["base"] >= 0.85 and acc["ablated"] <= 0.10
    assert report["sets"]["smiley"]["anchor_rate"]["ablated"] >= 0.80


@pytest.fixture(scope="module")
def three_run(tmp_path_factory):
    return _run(tmp_path_factory, xattn.get_config(f"concepts=toy_smiley;toy_striped;toy_memorized,"
                                                   f"eval.misspelling=False,{NO_EXPORT}"))


def test_three_concepts_in_one_model_remove_the_smiley_and_the_painting_and_keep_their_anchors(three_run):
    assert _acc(three_run, "smiley.smiley")["ablated"] <= 0.10
    rate = three_run["memorization"]["memorized"]["rate"]
    assert rate["base"] >= 0.85 and rate["ablated"] <= 0.10
    for name in ("smiley.circle", "memorized.orange_star", "striped.plain"):
        assert _acc(three_run, name)["ablated"] >= 0.95, name


@pytest.mark.xfail(strict=True, reason=(
    "seed 0: the smiley's held-out square loses 2 of 20 images (1.00 -> 0.90; 0.95 at seed 1), among them squares "
    "on striped backgrounds, which the stripes' removal beside it changes (docs/many-concepts.md)"))
def test_three_concepts_in_one_model_keep_the_smiley_and_the_paintings_neighbours(three_run):
    for name, s in three_run["sets"].items():
        if s["group"] in ("smiley", "memorized") and s["role"] in ("preserved", "surrounding"):
            acc = s["clip_accuracy"]
            assert acc["ablated"] >= acc["base"] - TOLERANCE, (name, acc)


@pytest.mark.xfail(strict=True, reason=(
    "removed beside the smiley and the memorized painting, the striped style goes to 0.20 at seeds 0 and 1 (0.10 and "
    "0.20 alone); the style preset's own limit (docs/many-concepts.md)"))
def test_three_concepts_in_one_model_remove_the_stripes(three_run):
    assert _acc(three_run, "striped.striped")["ablated"] <= 0.10


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory):
    return _run(tmp_path_factory, robust.get_config(f"eval.misspelling=False,{NO_EXPORT}"))


def test_robust_ablation_defeats_the_learned_embedding_and_keeps_the_neighbours(robust_run):
    attacks = robust_run["attacks"]
    assert {a["kind"] for a in attacks.values()} == {"misspelling", "paraphrase", "embedding", "search", "control"}
    # The learned attacks work on the base model: what they fail to do on the ablated one is the defence.
    assert min(a["success_rate"]["base"] for a in attacks.values() if a["kind"] in ("embedding", "search")) >= 0.5
    for name in ("embedding", "paraphrase_smiley_paraphrase"):
        assert attacks[name]["success_rate"]["ablated"] <= 0.20, (name, attacks[name]["success_rate"])
    assert _acc(robust_run, "smiley")["ablated"] <= 0.10
    assert _acc(robust_run, "circle")["ablated"] >= 0.95
    for name, s in robust_run["sets"].items():
        if s["role"] in ("preserved", "surrounding"):
            acc = s["clip_accuracy"]
            assert acc["ablated"] >= acc["base"] - TOLERANCE, (name, acc)


def test_what_the_search_finds_on_the_robust_model_does_not_need_the_removed_name(robust_run):
    # The prefix found against the ablated model draws smileys at most one image in 20 more often with the
    # target's name than with the anchor's in its place.
    attacks = robust_run["attacks"]
    search, control = attacks["search"]["success_rate"], attacks["search_without_target"]["success_rate"]
    assert search["ablated"] <= control["ablated"] + TOLERANCE, (search, control)


@pytest.mark.xfail(strict=True, reason=(
    "seed 0, 20 images: the unseen misspellings `smimey` and `smimley` come out 0.30 of the time (base model 0.20 "
    "and 0.35); at 40 images and seeds 0-2 their maximum is 0.275-0.40 (the best drawn again on seeds of its own "
    "0.20-0.475) and the search 0.10-0.45, its prefixes "
    "drawing smileys as often without the target's name (docs/attacks.md)"))
def test_robust_ablation_holds_every_attack_to_a_fifth(robust_run):
    for name, a in robust_run["attacks"].items():
        if a["kind"] != "control":  # the search's prefix without the target's name is no attack
            assert a["success_rate"]["ablated"] <= 0.20, (name, a["success_rate"])
