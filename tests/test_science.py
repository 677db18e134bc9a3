"""The method's effect on the toy world for each config other than the default (``make test-slow``).

Each test runs a whole job (anchors, training, evaluation) with the config's defaults and
checks the criterion its kind of concept is judged by. The default config's run is in
test_train.py and runs with ``make test``.
"""

import sys
from pathlib import Path

import pytest

from ablate_jax import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))

import embedding  # noqa: E402
import full  # noqa: E402
import xattn  # noqa: E402

pytestmark = pytest.mark.slow

NO_EXPORT = "export.enabled=False"


def _target(report, name):
    return report["sets"][name]["clip_accuracy"]


def test_style_ablation_turns_striped_backgrounds_plain(tmp_path):
    report = train.run(xattn.get_config(f"concept=toy_striped,{NO_EXPORT}"), tmp_path / "w", progress=False)
    acc = _target(report, "striped")
    assert acc["base"] >= 0.85 and acc["ablated"] <= 0.10
    assert report["sets"]["striped"]["anchor_rate"]["ablated"] >= 0.80
    dotted = _target(report, "dotted")
    assert abs(dotted["ablated"] - dotted["base"]) <= 0.05 + 1e-9


def test_memorized_image_is_no_longer_reproduced(tmp_path):
    report = train.run(full.get_config(NO_EXPORT), tmp_path / "w", progress=False)
    rate = report["memorization"]["rate"]
    assert rate["base"] >= 0.85 and rate["ablated"] <= 0.10


def test_embedding_run_removes_the_target(tmp_path):
    report = train.run(embedding.get_config(NO_EXPORT), tmp_path / "w", progress=False)
    acc = _target(report, "smiley")
    assert acc["base"] >= 0.85 and acc["ablated"] <= 0.10
    # Only the target's token rows moved: prompts without it draw exactly what they drew before.
    for name in ("circle", "frowny", "winky", "gaspy", "star", "square"):
        assert report["sets"][name]["kid"] == 0.0


def test_noise_based_run_removes_the_target(tmp_path):
    report = train.run(xattn.get_config(f"loss=noise_based,{NO_EXPORT}"), tmp_path / "w", progress=False)
    acc = _target(report, "smiley")
    assert acc["base"] >= 0.85 and acc["ablated"] <= 0.10
