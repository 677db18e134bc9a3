"""Anchor batches: deterministic in (seed, step), split across processes, augmented with masks and prefixes."""

import dataclasses

import numpy as np
import pytest

from ablate_jax import concepts
from ablate_jax.data import FAR_PREFIXES, NEAR_PREFIXES, AnchorBatches, augment


def _source(n=10, size=16):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "prompt": f"a cat number {i}".encode()}
            for i in range(n)]


def _concept():
    return concepts.Concept("instance", ("grumpy cat", "sad cat"), "cat", ("a cat number 1",), preserve=("tabby cat",))


def _tok(prompts):
    return np.asarray([[len(p), sum(map(ord, p)) % 1000] for p in prompts], np.int32)


def _batches(**kw):
    args = dict(seed=3, global_batch=4, latent_factor=4, with_keep=True)
    return AnchorBatches(_source(), _concept(), _tok, **{**args, **kw})


def test_batches_are_a_function_of_seed_and_step():
    a, b = _batches(), _batches()
    for step in (0, 1, 7):
        x, y = a.batch(step), b.batch(step)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(a.batch(0)["image"], a.batch(1)["image"])
    assert not np.array_equal(a.batch(0)["image"], _batches(seed=4).batch(0)["image"])


def test_every_record_is_seen_once_per_epoch():
    data = _batches(flip=False, rescale=False)
    anchors = [a for step in range(5) for _, a in data.prompts(step)]  # 20 examples = 2 epochs of 10
    assert sorted(anchors[:10]) == sorted(f"a cat number {i}" for i in range(10))
    assert sorted(anchors[10:]) == sorted(anchors[:10])


def test_processes_build_disjoint_slices_of_the_global_batch():
    whole = _batches().batch(2)
    parts = [_batches(process_index=p, process_count=2).batch(2) for p in range(2)]
    for k in whole:
        assert np.array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_target_and_keep_prompts_cycle_and_share_the_prefix():
    data = _batches(rescale=False)
    pairs = [data.example(k) for k in range(4)]
    assert [e["target"].split(" number")[0] for e in pairs] == ["a grumpy cat", "a sad cat"] * 2
    assert all(e["keep"].startswith("a tabby cat number") for e in pairs)
    data = _batches()
    for k in range(40):
        e = data.example(k)
        prefix = e["anchor"][: e["anchor"].index("a cat number")]
        assert e["target"].startswith(prefix) and e["keep"].startswith(prefix)
        assert prefix in ("", *FAR_PREFIXES, *NEAR_PREFIXES)


def test_rescale_masks_the_canvas_and_flip_mirrors():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x, mask, prefix = augment(image, np.random.default_rng(0), flip=False, rescale=False, latent_factor=4)
    np.testing.assert_allclose(x, image / 127.5 - 1, atol=1e-6)
    assert mask.shape == (8, 8, 1) and mask.min() == 1 and prefix == ""
    seen_far = seen_near = False
    for seed in range(60):
        x, mask, prefix = augment(image, np.random.default_rng(seed), flip=False, rescale=True, latent_factor=4)
        assert x.shape == (32, 32, 3) and set(np.unique(mask)) <= {0.0, 1.0}
        if prefix in FAR_PREFIXES:
            seen_far = True
            assert 0 < mask.sum() < mask.size
            # Image pixels are never exactly 0 in [-1, 1] (255 levels around 127.5); canvas pixels are.
            image_px = np.abs(x).sum(-1) > 0
            valid_px = np.kron(mask[..., 0], np.ones((4, 4))) == 1
            assert np.all(image_px[valid_px])  # the loss counts image, never canvas
            assert image_px.sum() < 0.36 * image_px.size  # small enough to earn the prefix
        if prefix in NEAR_PREFIXES:
            seen_near = True
            assert mask.min() == 1
    assert seen_far and seen_near
    flips = [augment(image, np.random.default_rng(s), flip=True, rescale=False, latent_factor=4)[0] for s in range(8)]
    mirrored = [np.allclose(f, (image / 127.5 - 1)[:, ::-1], atol=1e-6) for f in flips]
    assert any(mirrored) and not all(mirrored)


def test_misspelling_augmentation_changes_only_the_target_word_and_never_as_the_attack_does():
    plain, mixed = _batches(), _batches(misspell=0.5)
    attack_variants = set(concepts.misspellings("grumpy", extended=True).values())
    changed, split = 0, 0
    for k in range(200):
        a, b = plain.example(k), mixed.example(k)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
        assert (a["anchor"], a["keep"]) == (b["anchor"], b["keep"])  # every other draw is the run's own
        if a["target"] != b["target"]:
            changed += 1
            start = a["target"].index("grumpy")
            end = len(b["target"]) - len(a["target"][start + len("grumpy"):])
            wrong = b["target"][start:end]
            assert wrong != "grumpy" and wrong not in attack_variants
            assert b["target"] == a["target"].replace("grumpy", wrong)
            # One letter changed, or the word split in two by a space.
            assert abs(len(wrong) - len("grumpy")) <= 1
            split += " " in wrong
            assert wrong.replace(" ", "") == "grumpy" or " " not in wrong
    # Half the examples, of which those naming "sad cat" (the second target) have no "grumpy" to change.
    assert 30 <= changed <= 70
    assert 0 < split < changed  # a sixth of the misspellings split the word


def test_paraphrase_augmentation_names_the_target_by_its_aliases_and_leaves_every_other_draw():
    aliased = dataclasses.replace(_concept(), aliases=("cat that frowns", "sour cat"))
    plain = AnchorBatches(_source(), aliased, _tok, seed=3, global_batch=4, latent_factor=4, with_keep=True)
    mixed = AnchorBatches(_source(), aliased, _tok, seed=3, global_batch=4, latent_factor=4, with_keep=True,
                          paraphrase=0.5, misspell=0.5)
    misspelled = AnchorBatches(_source(), aliased, _tok, seed=3, global_batch=4, latent_factor=4, with_keep=True,
                               misspell=0.5)
    said = {"cat that frowns": 0, "sour cat": 0}
    for k in range(200):
        a, b, m = plain.example(k), mixed.example(k), misspelled.example(k)
        assert np.array_equal(a["image"], b["image"]) and (a["anchor"], a["keep"]) == (b["anchor"], b["keep"])
        alias = next((x for x in said if x in b["target"]), None)
        if alias:
            said[alias] += 1
            assert b["target"] == a["anchor"].replace("cat", alias)  # the alias where the target was
        else:
            assert b["target"] == m["target"]  # the others misspelled exactly as without paraphrases
    assert 70 <= sum(said.values()) <= 130 and min(said.values()) > 20
    with pytest.raises(ValueError, match="aliases"):
        AnchorBatches(_source(), _concept(), _tok, seed=3, global_batch=4, latent_factor=4, paraphrase=0.5)


def test_context_augmentation_puts_the_same_words_before_every_prompt_and_never_a_name_of_the_target():
    vocabulary = ("grumpy", "sofa", "dark", "sad", "lamp", "window")
    plain, mixed = _batches(misspell=0.5), _batches(misspell=0.5, context=0.5, vocabulary=vocabulary)
    prefixed = 0
    for k in range(200):
        a, b = plain.example(k), mixed.example(k)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
        if b["target"] == a["target"]:
            assert (a["anchor"], a["keep"]) == (b["anchor"], b["keep"])
            continue
        prefixed += 1
        context = b["anchor"][: len(b["anchor"]) - len(a["anchor"])]
        words = context.split()
        assert 1 <= len(words) <= 3 and context == " ".join(words) + " "
        assert set(words) <= {"sofa", "dark", "lamp", "window"}  # "grumpy" and "sad" name the targets
        # The same words before the target, the anchor and the kept concept; the rest of the example unchanged.
        assert (b["target"], b["anchor"], b["keep"]) == (context + a["target"], context + a["anchor"],
                                                         context + a["keep"])
    assert 70 <= prefixed <= 130
    with pytest.raises(ValueError, match="vocabulary"):
        _batches(context=0.5, vocabulary=("grumpy", "sad"))


def test_context_words_of_several_concepts_name_none_of_their_targets():
    dog = concepts.Concept("instance", ("corgi dog",), "dog", ("a dog number 1",), aliases=("fluffy corgi",))
    vocabulary = ("grumpy", "corgi", "fluffy", "sofa", "lamp")
    data = AnchorBatches((_source(), _source()), (_concept(), dog), _tok, seed=3, global_batch=4, latent_factor=4,
                         context=1.0, vocabulary=vocabulary)
    assert data.vocabulary == ("sofa", "lamp")  # no target's word nor an alias's, whichever concept the example is
    assert all(data.example(k)["anchor"].split()[0] in data.vocabulary for k in range(20))
