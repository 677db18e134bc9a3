"""Several concepts removed from one model: the config, the mixed batches, the loss and the report
(a whole run is in test_train.py, its removal figures in test_science.py)."""

import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from ablate_jax import concepts, losses, report, workdir
from ablate_jax import config as config_lib
from ablate_jax.data import AnchorBatches

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import xattn  # noqa: E402

THREE = "toy_smiley;toy_striped;toy_memorized"


def _spec(arg="", **flags):
    config = xattn.get_config(arg)
    for key, value in flags.items():
        config_lib.override(config, key.replace("__", "."), value)
    return config_lib.prepare(config)


def test_every_route_gives_the_same_concepts_and_each_part_is_the_concept_alone():
    by_arg = _spec(f"concepts={THREE}")
    by_flag = _spec(concepts=THREE)
    from_file = xattn.get_config()
    from_file.concepts = tuple(THREE.split(";"))
    by_file = config_lib.prepare(from_file)
    for spec in (by_arg, by_flag, by_file):
        assert spec.labels == ("smiley", "striped", "memorized")
        assert [c.kind for c in spec.concepts] == ["instance", "style", "memorization"]
        assert [c.targets[0] for c in spec.concepts[:2]] == ["smiley", "striped"]
        # Each concept sees the examples it sees alone: 600 steps each on the toy world.
        assert spec.config.train.steps == 1800 and spec.config.preserve.weight == 4.0
    assert config_lib.fingerprint(by_arg.config, *config_lib.TRAIN_KEYS) == \
        config_lib.fingerprint(by_file.config, *config_lib.TRAIN_KEYS)
    # A part's anchors are those of the concept removed alone, so a shared store serves both.
    for name, part in zip(THREE.split(";"), by_arg.parts, strict=True):
        alone = _spec(f"concept={name}")
        assert part.concept == alone.concept
        assert workdir.anchor_key(workdir.anchor_identity(part)) == workdir.anchor_key(workdir.anchor_identity(alone))
    with pytest.raises(config_lib.ConfigError, match="one concept at a time"):
        by_arg.concept  # noqa: B018


def test_a_target_is_never_preserved_and_bad_lists_are_refused(tmp_path):
    prompts = tmp_path / "circles.txt"
    prompts.write_text("\n".join(f"a {c} circle on a plain background" for c in ("red", "blue", "green", "yellow",
                                                                                 "purple", "white", "black")))
    frowny = config_lib.concept_fields(kind="instance", target="frowny", anchor="circle", anchor_prompts=str(prompts))
    config = xattn.get_config()
    config.concepts = ("toy_smiley", frowny)
    spec = config_lib.prepare(config)
    smiley, other = spec.concepts
    assert smiley.preserve == ("winky",)
    assert "frowny" not in {s.concept for s in smiley.eval_sets}  # measured as the other concept's target
    assert next(s for s in other.eval_sets if s.role == "target").concept == "frowny"
    with pytest.raises(config_lib.ConfigError, match="two or more"):
        _spec("concepts=toy_smiley")
    with pytest.raises(config_lib.ConfigError, match="its own list"):
        _spec(f"concepts={THREE}", preserve__concepts="frowny")
    squares = tmp_path / "squares.txt"
    squares.write_text(prompts.read_text().replace("circle", "square"))
    circle = config_lib.concept_fields(kind="instance", target="circle", anchor="square",
                                       anchor_prompts=str(squares))
    config = xattn.get_config()
    config.concepts = ("toy_smiley", circle)  # the smiley's anchor is the other's target
    with pytest.raises(config_lib.ConfigError, match="anchor 'circle'"):
        config_lib.prepare(config)
    with pytest.raises(config_lib.ConfigError, match="unknown field"):
        config_lib.concept_fields(targets="x")
    # An entry takes exactly the concept section's fields, its own preservation list and its aliases.
    assert config_lib._ENTRY_FIELDS == set(xattn.get_config().concept) | {"preserve", "aliases"}


def test_an_alias_of_another_concepts_target_is_never_preserved_and_an_entry_sets_its_own(tmp_path):
    assert _spec(f"concepts={THREE}").concepts[1].aliases == ("stripy", "stripes")
    prompts = tmp_path / "circles.txt"
    prompts.write_text("\n".join(f"a {c} circle on a plain background" for c in ("red", "blue", "green", "yellow",
                                                                                 "purple", "white", "black")))
    # "sad face" names the frowny here: the smiley no longer preserves a concept called that.
    frowny = config_lib.concept_fields(kind="instance", target="frowny", anchor="circle", anchor_prompts=str(prompts),
                                       aliases=("sad face", "frowning face"))
    config = xattn.get_config()
    config.concepts = (config_lib.concept_fields(preset="toy_smiley", preserve="winky;sad face"), frowny)
    smiley, other = config_lib.prepare(config).concepts
    assert other.aliases == ("sad face", "frowning face") and other.names == ("frowny", "sad face", "frowning face")
    assert smiley.preserve == ("winky",)
    config.concepts = (config_lib.concept_fields(preset="toy_striped", aliases="stripy"), "toy_smiley")
    assert config_lib.prepare(config).concepts[0].aliases == ("stripy",)  # the entry's, not the preset's
    # The painting's preset has no aliases; its entry's serve the paraphrase augmentation.
    config = xattn.get_config("robust.paraphrase=0.25")
    config.concepts = ("toy_smiley", config_lib.concept_fields(preset="toy_memorized", aliases="zorblax picture"))
    assert config_lib.prepare(config).concepts[1].aliases == ("zorblax picture",)
    config.concepts = ("toy_smiley", "toy_memorized")
    with pytest.raises(config_lib.ConfigError, match="has none"):
        config_lib.prepare(config)


def _source(word, n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "prompt": f"a {word} number {i}"}
            for i in range(n)]


def _tok(prompts):
    return np.asarray([[len(p), sum(map(ord, p)) % 1000] for p in prompts], np.int32)


def test_batches_mix_the_concepts_and_build_each_example_from_its_own():
    cats = concepts.Concept("instance", ("grumpy cat",), "cat", ("a cat number 1",), preserve=("tabby cat",))
    painting = concepts.Concept("memorization", ("the famous painting",), "orange star", ("an orange star",))
    data = AnchorBatches([_source("cat", 6), _source("orange star", 4, seed=1)], [cats, painting], _tok, seed=0,
                         global_batch=5, latent_factor=4, with_keep=True)
    assert len(data) == 10
    # The concepts take turns; each goes through all its records before repeating one.
    examples = [data.example(k) for k in range(12)]
    assert [e["concept"] for e in examples] == [0, 1] * 6
    plain = [re.search(r"a (cat|orange star) number \d", e["anchor"]).group(0) for e in examples]
    assert sorted(plain[0::2]) == [f"a cat number {i}" for i in range(6)]
    assert sorted(plain[1::2][:4]) == [f"a orange star number {i}" for i in range(4)]
    for e in examples:
        if e["concept"] == 0:
            assert e["target"] == e["anchor"].replace("cat", "grumpy cat")
            assert "tabby cat number" in e["keep"] and e["keep_weight"] == 1.0
        else:
            # A memorized image is trained as drawn: no rescale, so no prefix and a whole mask.
            assert e["target"] == "the famous painting" and e["keep"] == e["anchor"] and e["keep_weight"] == 0.0
            assert e["mask"].min() == 1.0
    batch = data.batch(0)
    assert batch["keep_weight"].shape == (5,) and set(batch["keep_weight"]) <= {0.0, 1.0}
    assert {e["concept"] for e in (data.example(k) for k in range(5))} == {0, 1}
    # One concept alone keeps the batch it always had: no keep weights.
    alone = AnchorBatches(_source("cat", 6), cats, _tok, seed=0, global_batch=2, latent_factor=4, with_keep=True)
    assert "keep_weight" not in alone.batch(0)


def test_anchors_that_name_another_concepts_target_are_left_out():
    smiley = concepts.Concept("instance", ("smiley",), "circle", ("a circle",))
    striped = concepts.Concept("style", ("striped",), "plain", ("a smiley on a plain background",),
                               style_templates=("{pt}",))
    shapes = [{"image": np.zeros((8, 8, 3), np.uint8), "prompt": f"a {s} on a plain background"}
              for s in ("square", "smiley", "star", "smiley")]
    data = AnchorBatches([_source("circle", 3), shapes], [smiley, striped], _tok, seed=0, global_batch=1,
                         latent_factor=4)
    # "a smiley on a striped background" -> the teacher's smiley would teach the smiley to stay.
    assert data.left_out == {"smiley": 0, "striped": 2} and len(data) == 5
    assert not any("smiley" in data.example(k)["anchor"] for k in range(10))
    with pytest.raises(ValueError, match="names another concept's target"):
        AnchorBatches([_source("circle", 3), shapes[1:2]], [smiley, striped], _tok, seed=0, global_batch=1,
                      latent_factor=4)
    # Another word for the style is the style: "a circle on a stripy background" would teach the stripes to stay.
    striped = concepts.Concept("style", ("striped",), "plain", ("a square on a plain background",),
                               style_templates=("{pt}",), aliases=("stripy", "stripes"))
    circles = [{"image": np.zeros((8, 8, 3), np.uint8), "prompt": p}
               for p in ("a circle on a stripy background", "a circle against stripes", "a circle",
                         "a circle on a plain background")]
    data = AnchorBatches([circles, shapes[:1]], [smiley, striped], _tok, seed=0, global_batch=2, latent_factor=4,
                         rescale=False)
    assert data.left_out == {"smiley": 2, "striped": 0}
    assert {data.example(k)["anchor"] for k in range(0, 8, 2)} == {"a circle", "a circle on a plain background"}


def test_rows_without_a_concept_to_preserve_add_nothing_to_the_preservation_term():
    rng = np.random.default_rng(0)
    b = 4
    x_t = jnp.asarray(rng.normal(size=(b, 4, 4, 2)), jnp.float32)
    t = jnp.arange(b)
    ctx = {k: jnp.asarray(rng.normal(size=(b, 3, 2)), jnp.float32)
           for k in ("student_target", "anchor", "keep", "student_keep")}
    mask = jnp.ones((b, 4, 4, 1))

    def student(x, tt, c):
        return x * 0.5 + c.mean(axis=1)[:, None, None, :]

    def teacher(x, tt, c):
        return x * 0.4 + c.sum(axis=1)[:, None, None, :]

    cfg = losses.LossConfig(preserve_weight=2.0)
    _, terms = losses.ablation_loss(student, teacher, x_t, t, ctx, x_t, mask, cfg,
                                    keep_weight=jnp.asarray([1.0, 0.0, 1.0, 0.0]))
    rows = jnp.asarray([0, 2])
    _, only = losses.ablation_loss(student, teacher, x_t[rows], t[rows], {k: v[rows] for k, v in ctx.items()},
                                   x_t[rows], mask[rows], cfg)
    # The kept rows' error, averaged over every row: each concept weighs its share of the batch.
    np.testing.assert_allclose(terms["preserve"], only["preserve"] * 2 / 4, rtol=1e-6)
    _, whole = losses.ablation_loss(student, teacher, x_t, t, ctx, x_t, mask, cfg)
    assert abs(float(whole["preserve"]) - float(terms["preserve"])) > 1e-3


def test_the_report_schema_knows_several_concepts():
    pair = {"base": 1.0, "ablated": 0.0}
    entry = {"role": "target", "concept": "smiley", "n_images": 2, "clip_score": pair, "clip_accuracy": pair,
             "anchor_rate": pair, "kid": 0.1}
    good = {"concepts": [{"label": "a", "kind": "instance", "targets": ["x"], "anchor": "y", "preserve": []},
                         {"label": "b", "kind": "memorization", "targets": ["z"], "anchor": "y", "preserve": []}],
            "settings": {"base_only": False},
            "sets": {"a.x": {**entry, "group": "a"}, "b.z": {**entry, "group": "b"}},
            "memorization": {"b": {"method": "m", "threshold": 0.5, "sets": ["b.z"], "n_images": 2, "rate": pair,
                                   "similarity": pair}},
            "timing_s": {"eval": 1.0}}
    report.check_report(good)
    assert "Memorization (b)" in report.format_table(good)
    for bad, match in (({**good, "concept": good["concepts"][0]}, "either"),
                       ({**good, "sets": {"x": {**entry, "group": "a"}}}, "group"),
                       ({**good, "memorization": {}}, "one block per memorization concept")):
        with pytest.raises(ValueError, match=match):
            report.check_report(bad)
