"""A CLIP-format byte-level BPE tokenizer for the toy world, trained with the ``tokenizers`` library.

The folder ``train_tokenizer`` writes is what Stable Diffusion ships in ``tokenizer/`` and what
``transformers.CLIPTokenizer.from_pretrained`` reads: ``vocab.json``, ``merges.txt``,
``tokenizer_config.json`` and ``special_tokens_map.json``. It follows CLIP's scheme exactly:

* text is NFC-normalised, runs of whitespace become one space, and it is lower-cased;
* it is split into words with CLIP's regular expression (letters runs, single digits, punctuation runs,
  English contractions), each word is mapped to GPT-2's byte-level characters, and the last sub-token of a
  word carries the end-of-word suffix ``</w>``;
* the vocabulary is the 256 byte-level characters, the same 256 with ``</w>``, then one token per merge in
  merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (BOS, and EOS = PAD = UNK) last — so every string
  tokenizes without unknown tokens, misspellings into several sub-word pieces.

Training is deterministic: the same captions give byte-identical files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from ablate_jax.toy import world

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 20
"""Default ``model_max_length``: the longest world caption (or evaluation prompt) plus BOS and EOS fits."""

# CLIP's word splitter (transformers' CLIPTokenizer and OpenAI's simple_tokenizer use the same expression).
CLIP_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

EVAL_TEMPLATE = "A photo depicts {}"
"""The evaluator's prompt around ``world.concept_prompt`` phrases; its words are in the tokenizer corpus."""


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def _word_splitter() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in CLIP's vocabulary order (printable bytes first)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = [chr(b) for b in printable]
    n = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + n))
            n += 1
    return chars


def clip_words(text: str) -> list[str]:
    """The words CLIP's tokenizer splits ``text`` into, after normalisation (lower case), as plain text."""
    return [w for w, _ in _word_splitter().pre_tokenize_str(_normalizer().normalize_str(text))]


def normalise(text: str) -> str:
    """What ``CLIPTokenizer.decode(encode(text), skip_special_tokens=True)`` gives back: its words, space-joined.

    E.g. "A green star,  checkered background" -> "a green star , checkered background".
    """
    return " ".join(clip_words(text))


def train_tokenizer(
    captions: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1000,
    model_max_length: int = MAX_LENGTH,
) -> Path:
    """Learns byte-level BPE merges on ``captions`` and writes a CLIP-format tokenizer folder to ``out_dir``.

    ``vocab_size`` caps the vocabulary: 512 byte-level tokens, at most ``vocab_size - 514`` merges (the first
    ones learned; training stops earlier once every word is a single token) and the 2 special tokens. Raises
    ValueError if a caption would not fit in ``model_max_length`` tokens with BOS and EOS. Returns ``out_dir``.
    Deterministic: the same captions (in any order) give byte-identical files.
    """
    captions = list(captions)
    if vocab_size < 514:
        raise ValueError(f"vocab_size must leave room for the 512 byte tokens and 2 special tokens, got {vocab_size}")
    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence([_word_splitter(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,  # the trainer counts fewer base tokens than we write, so this is only an upper bound
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD,
    )
    tok.train_from_iterator(captions, trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]
    ]
    merges = merges[: vocab_size - 514]  # a prefix of BPE merges is itself a valid merge list

    # CLIP's vocabulary order: bytes, bytes + </w>, merge results in merge order, specials last.
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
    seen = set(tokens)
    for a, b in merges:
        if a not in seen or b not in seen:  # cannot happen for a BPE merge list; guards the format
            raise AssertionError(f"merge {a!r} {b!r} uses a token not in the vocabulary")
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")

    # Check the length contract with the tokenizer just written (same BPE, same pre-tokenization).
    check = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    check.normalizer, check.pre_tokenizer = tok.normalizer, tok.pre_tokenizer
    lengths = [len(e.ids) + 2 for e in check.encode_batch(captions)]
    if lengths and max(lengths) > model_max_length:
        longest = captions[int(np.argmax(lengths))]
        raise ValueError(
            f"{longest!r} needs {max(lengths)} tokens with BOS/EOS, more than model_max_length={model_max_length}"
        )
    return out


def world_corpus(n: int = 20_000, seed: int = 0, memorized_rate: float = 0.02) -> list[str]:
    """Captions to train the toy tokenizer on: the captions of ``world.training_batch(seed, 0, n, ...,
    memorized_rate)`` (made without drawing the images), every instance description, and the evaluation prompts
    ``EVAL_TEMPLATE.format(...)`` of every ``world.concept_prompt`` and instance description.
    """
    texts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        if rng.random() < memorized_rate:
            texts.append(world.MEMORIZED_CAPTION)
        else:
            texts.append(world.caption(world.sample_scene(rng), rng))
    texts += [d for ds in world.INSTANCE_DESCRIPTIONS.values() for d in ds]
    concepts = [c for values in world.all_concepts().values() for c in values] + ["memorized"]
    texts += [EVAL_TEMPLATE.format(world.concept_prompt(c)) for c in concepts]
    texts += [EVAL_TEMPLATE.format(d) for ds in world.INSTANCE_DESCRIPTIONS.values() for d in ds]
    return texts


def build_world_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1000, n: int = 20_000, seed: int = 0) -> Path:
    """The toy world's tokenizer: ``train_tokenizer(world_corpus(n, seed), out_dir, vocab_size)``."""
    return train_tokenizer(world_corpus(n, seed), out_dir, vocab_size=vocab_size)
