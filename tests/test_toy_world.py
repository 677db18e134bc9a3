"""The toy world (scenes, rendering, captions, memorization detector) and its CLIP-format tokenizer."""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import replace

import numpy as np
import pytest

from ablate_jax.toy import tokenizer as toytok
from ablate_jax.toy import world

# --------------------------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------------------------


def _examples(seed: int, n: int, memorized_rate: float = 0.02):
    return [world.training_example(np.random.default_rng([seed, i]), 32, memorized_rate) for i in range(n)]


@pytest.fixture(scope="module")
def examples():
    return _examples(seed=5, n=400)


def test_training_batch_depends_only_on_seed_and_index():
    images, captions = world.training_batch(seed=3, index_start=0, n=12, size=32, memorized_rate=0.1)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8 and len(captions) == 12
    again, again_captions = world.training_batch(3, 0, 12, 32, 0.1)
    np.testing.assert_array_equal(images, again)
    assert captions == again_captions
    # Example i is the same whichever batch it is made in.
    tail, tail_captions = world.training_batch(3, 7, 5, 32, 0.1)
    np.testing.assert_array_equal(tail, images[7:])
    assert tail_captions == captions[7:]
    # ... and matches training_example with the documented generator.
    image, text, _ = world.training_example(np.random.default_rng([3, 4]), 32, 0.1)
    np.testing.assert_array_equal(image, images[4])
    assert text == captions[4]
    # Different indices and seeds give different examples (apart from repeats of the memorized image).
    fresh, _ = world.training_batch(3, 0, 12, 32, 0.0)
    assert len({im.tobytes() for im in fresh}) == 12
    other, _ = world.training_batch(4, 0, 12, 32, 0.1)
    assert not np.array_equal(other, images)


def test_every_attribute_value_appears(examples):
    scenes = [s for _, _, s in examples if s != world.MEMORIZED_SCENE]
    assert {s.shape for s in scenes} == set(world.SHAPES + world.INSTANCES)
    assert {s.colour for s in scenes} == set(world.COLOURS)
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    assert {s.bg_tone for s in scenes} == set(world.BG_TONES)
    captions = [c for _, c, _ in examples]
    assert world.MEMORIZED_CAPTION in captions  # 2% of 400
    text = " | ".join(captions)
    for word in world.SHAPES + world.INSTANCES + tuple(world.COLOURS):
        assert re.search(rf"\b{word}\b", text), word
    for word in ("plain", "striped", "stripes", "checkered", "dots", "dotted", "wavy", "waves", "dark", "light"):
        assert re.search(rf"\b{word}\b", text), word
    descriptions = [p for ps in world._INSTANCE_PHRASES.values() for p in ps]
    assert any(p in text for p in descriptions)


def test_captions_name_the_attributes(examples):
    bg_words = {b: world._BG_ADJ[b] + world._BG_NOUN[b] for b in world.BACKGROUNDS}
    n = names_object = names_colour = names_bg = 0
    for _, text, scene in examples:
        if scene == world.MEMORIZED_SCENE:
            assert text == world.MEMORIZED_CAPTION
            continue
        assert "zorblax" not in text and "famous" not in text and "painting" not in text
        assert text == text.lower().strip() and "  " not in text
        n += 1
        words = set(re.findall(r"[a-z]+", text))
        described = scene.shape in world.INSTANCES and any(p in text for p in world._INSTANCE_PHRASES[scene.shape])
        names_object += scene.shape in words or described
        names_colour += scene.colour in words
        names_bg += any(w in text for w in bg_words[scene.background])
        # Never a wrong attribute value.
        assert not (words & set(world.COLOURS)) - {scene.colour}, text
        assert not (words & set(world.SHAPES + world.INSTANCES)) - {scene.shape, "circle"}, text
    assert names_object == n
    assert names_colour > 0.85 * n and names_bg > 0.75 * n


def test_instance_captions_paraphrase_without_the_name():
    rng = np.random.default_rng(0)
    for instance, descriptions in world.INSTANCE_DESCRIPTIONS.items():
        scene = world.sample_scene(rng, shapes=[instance])
        for _ in range(20):
            text = world.caption(scene, rng, describe=True)
            assert instance not in text and any(d[2:] in text for d in descriptions), text
            assert instance in re.findall(r"[a-z]+", world.caption(scene, rng, describe=False))
        # Descriptions never name any instance.
        assert not any(i in d for d in descriptions for i in world.INSTANCES)


def test_render_shapes_sizes_and_restrictions():
    rng = np.random.default_rng(1)
    scene = world.sample_scene(rng, shapes=["smiley"], colours=["red"], backgrounds=["striped"])
    assert (scene.shape, scene.colour, scene.background) == ("smiley", "red", "striped")
    small, large = world.render(scene, 32), world.render(scene, 64)
    assert small.shape == (32, 32, 3) and large.shape == (64, 64, 3) and large.dtype == np.uint8
    # Geometry is resolution-independent: the 64-pixel image, block-averaged, is the 32-pixel one.
    down = large.reshape(32, 2, 32, 2, 3).astype(np.float32).mean(axis=(1, 3))
    assert np.abs(down - small).mean() < 3.0
    np.testing.assert_array_equal(world.render(scene, 32), small)  # pure function of the scene
    with pytest.raises(ValueError):
        world.sample_scene(rng, shapes=["hexagon"])
    with pytest.raises(ValueError):
        world.sample_scene(rng, colours=[])


def test_rendering_is_fast():
    start = time.perf_counter()
    world.training_batch(0, 0, 500, 32, 0.02)
    assert time.perf_counter() - start < 5.0  # 10k images in well under a minute, with a wide margin


def test_instances_are_distinguishable():
    base = world.Scene("circle", "yellow", "plain", "light", x=0.5, y=0.5, scale=0.34)
    images = {s: world.render(replace(base, shape=s), 32).astype(np.float32) for s in world.INSTANCES + ("circle",)}
    r = 0.34 * 32
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    disc = (xx - 16) ** 2 + (yy - 16) ** 2 < r * r
    mouth = disc & (yy > 16 + 0.1 * r)  # lower part of the face
    for a, b in itertools.combinations(images, 2):
        # At least a feature's worth of pixels (an eye is ~3x3) clearly differs.
        assert (np.abs(images[a] - images[b]).mean(axis=-1)[disc] > 60).sum() >= 6, (a, b)
    # The hard negative differs from the ablated instance only in the mouth, and clearly so there.
    diff = np.abs(images["smiley"] - images["frowny"]).mean(axis=-1)
    assert diff[mouth].mean() > 20 and (diff[mouth] > 60).sum() >= 15
    assert diff[disc & ~mouth].max() < 1


def test_colours_contrast_with_backgrounds():
    def dist(a, b):
        return float(np.linalg.norm(np.subtract(a, b, dtype=np.float32)))

    for a, b in itertools.combinations(world.COLOURS.values(), 2):
        assert dist(a, b) >= 100
    for colour in world.COLOURS.values():
        for tones in world.BG_TONES.values():
            for tone in tones:
                assert dist(colour, tone) >= 100
                assert max(tone) - min(tone) < 16  # backgrounds are neutral: no colour of their own
        assert dist(colour, world.FEATURE_COLOUR) >= 100  # face features show on every colour
    # In rendered images: the object's centre has its colour, far from the background's corners.
    rng = np.random.default_rng(2)
    for _ in range(100):
        scene = world.sample_scene(rng)
        image = world.render(scene, 32).astype(np.float32)
        centre = image[int(scene.y * 32), int(scene.x * 32)]
        assert dist(centre, world.COLOURS[scene.colour]) < 30, scene
        for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
            assert dist(centre, corner) > 80, scene


def test_memorization_similarity_separates_the_memorized_image():
    rng = np.random.default_rng(3)
    threshold = world.MEMORIZATION_THRESHOLD
    exact = world.memorization_similarity(world.memorized_image(32))
    assert exact.shape == (1,) and exact[0] > 0.99
    assert world.memorization_similarity(world.memorized_image(64))[0] > 0.99
    # Slight re-renders (jittered placement, other resolution, pixel noise) stay above the threshold.
    rerenders = []
    for size in (32, 64):
        for _ in range(20):
            image = world.render(world.memorized_scene(rng), size).astype(np.float32)
            rerenders.append(np.clip(image + rng.normal(0, 8, image.shape), 0, 255))
    close = np.concatenate([world.memorization_similarity(im) for im in rerenders])
    assert close.min() > threshold + 0.05
    # Ordinary scenes, including the memorized image's own object and style, stay well below.
    ordinary = np.stack([world.render(world.sample_scene(rng), 32) for _ in range(300)])
    hard = np.stack(
        [
            world.render(world.sample_scene(rng, shapes=["star"], colours=["orange"], backgrounds=["wavy"]))
            for _ in range(100)
        ]
    )
    far = world.memorization_similarity(np.concatenate([ordinary, hard]))
    assert far.shape == (400,) and far.min() >= 0.0
    assert far.max() < threshold - 0.1
    assert np.median(far) < 0.3
    assert world.caption(world.memorized_scene(rng), rng) == world.MEMORIZED_CAPTION
    # The training stream repeats exactly the memorized image.
    image, text, scene = world.training_example(rng, 32, memorized_rate=1.0)
    np.testing.assert_array_equal(image, world.memorized_image(32))
    assert (text, scene) == (world.MEMORIZED_CAPTION, world.MEMORIZED_SCENE)


def test_concepts_and_prompts():
    concepts = world.all_concepts()
    assert set(concepts) == {"shape", "colour", "background"}
    assert set(concepts["shape"]) == set(world.SHAPES + world.INSTANCES)
    assert world.concept_prompt("smiley") == "a smiley"
    assert world.concept_prompt("orange") == "an orange shape"
    assert world.concept_prompt("striped") == "a striped background"
    assert world.concept_prompt("memorized") == world.MEMORIZED_CAPTION
    assert world.concept_attribute("wavy") == "background"
    with pytest.raises(ValueError):
        world.concept_prompt("grumpy cat")


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    return toytok.world_corpus()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus):
    return toytok.train_tokenizer(corpus, tmp_path_factory.mktemp("toytok"), vocab_size=1000)


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tok_dir)


def test_tokenizer_files_follow_clip_format(tok_dir, tok):
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and merges[-1] == ""
    byte_chars = list(_gpt2_bytes_to_unicode().values())
    ordered = sorted(vocab, key=vocab.get)
    assert ordered[:512] == byte_chars + [c + "</w>" for c in byte_chars]
    assert ordered[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) <= 1000
    assert ordered[512:-2] == list(dict.fromkeys("".join(m.split(" ")) for m in merges[1:-1]))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == toytok.MAX_LENGTH and config["do_lower_case"] is True
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|startoftext|>",) + ("<|endoftext|>",) * 3
    assert (tok.bos_token_id, tok.eos_token_id) == (len(vocab) - 2, len(vocab) - 1) and len(tok) == len(vocab)
    assert tok.model_max_length == toytok.MAX_LENGTH


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """OpenAI's table, written out independently of the module under test."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _reference_clip_bpe(tok_dir, text: str) -> list[int]:
    """OpenAI CLIP's simple_tokenizer algorithm (lowest-rank merge first, </w> on a word's last symbol)."""
    regex = pytest.importorskip("regex")

    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(lines)}
    table = _gpt2_bytes_to_unicode()
    words = regex.findall(toytok.CLIP_WORD_PATTERN, re.sub(r"\s+", " ", text).strip().lower())
    ids = [vocab["<|startoftext|>"]]
    for word in words:
        chars = "".join(table[b] for b in word.encode("utf-8"))
        symbols = list(chars[:-1]) + [chars[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in itertools.pairwise(symbols)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids += [vocab[s] for s in symbols]
    return ids + [vocab["<|endoftext|>"]]


ODD_STRINGS = [
    "smilye",
    "a rde smiely on strpied bakground",
    "zorblaxx",
    "héllo wörld 😀 #42",
    "don't STOP!!",
    "x" * 30,
    "  \t ",
]


def test_tokenizer_matches_reference_bpe(tok_dir, tok, corpus):
    for text in corpus[:200:7] + ODD_STRINGS:
        assert tok(text).input_ids == _reference_clip_bpe(tok_dir, text), text


def test_tokenizer_round_trip_and_no_unknown_tokens(tok, corpus):
    rng = np.random.default_rng(4)
    randoms = ["".join(chr(int(c)) for c in rng.integers(32, 0x2FFF, size=rng.integers(1, 12))) for _ in range(50)]
    for text in corpus[::97] + ODD_STRINGS + randoms:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids[1:-1], text  # UNK is EOS: it must not appear inside
        assert tok.decode(ids, skip_special_tokens=True) == toytok.normalise(text), text
    assert toytok.normalise("A green star,  checkered background") == "a green star , checkered background"


def test_world_words_are_single_tokens(tok, corpus):
    words = {w for text in corpus for w in toytok.clip_words(text)}
    assert {"smiley", "frowny", "striped", "checkered", "red", "purple", "zorblax", "depicts"} <= words
    for word in words:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tok("smilye", add_special_tokens=False).input_ids) >= 2
    # Every training caption fits, with BOS and EOS, in model_max_length.
    batch = tok(corpus, padding="max_length", max_length=tok.model_max_length, truncation=False, return_tensors="np")
    assert batch.input_ids.shape == (len(corpus), toytok.MAX_LENGTH)


def test_tokenizer_training_is_deterministic(tmp_path, tok_dir, corpus):
    again = toytok.train_tokenizer(corpus[::-1], tmp_path / "again", vocab_size=1000)  # order does not matter
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tok_dir / name).read_bytes(), name
    small = toytok.train_tokenizer(corpus, tmp_path / "small", vocab_size=600, model_max_length=64)
    assert len(json.loads((small / "vocab.json").read_text(encoding="utf-8"))) == 600
    with pytest.raises(ValueError, match="model_max_length"):
        toytok.train_tokenizer(corpus, tmp_path / "short", model_max_length=8)


def test_world_corpus_is_the_training_stream_captions(corpus):
    _, captions = world.training_batch(0, 0, 50, 8, 0.02)
    assert corpus[:50] == captions
