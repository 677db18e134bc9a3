"""Anchor images -> augmented training batches, deterministic in (seed, step), split over processes.

Global example ``k`` of the run (``k = step * global_batch + j``) is anchor record
``perm_e[k mod N]``, where ``perm_e`` is the permutation of epoch ``e = k // N`` drawn from the
seed; its augmentation draws from ``(seed, k)``. A batch is therefore a pure function of the
seed and the step: the data position after a restart is just the restored step, and every
process builds only its own slice of the global batch (rows ``p*B/P .. (p+1)*B/P``).

Augmentation (docs/design.md, "Training data and augmentation"): horizontal flip; random rescale, two thirds of the time shrinking
the image into a grey canvas (the loss then counts only the latent cells the image covers, and
a prefix such as "a far away" goes on the prompts when the image is small), otherwise zooming in
1.2-1.4x with a prefix such as "zoomed in". The prefix goes on every prompt of the example
(target, anchor, kept concept), so student and teacher are conditioned on the same scene.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ablate_jax.concepts import Concept, misspellings, random_misspelling, replace_word, target_word, word_pattern

FAR_PREFIXES = ("a far away ", "very small ")
NEAR_PREFIXES = ("zoomed in ", "close up ")
SHRINK_PROBABILITY = 0.66


def augment(image: np.ndarray, rng: np.random.Generator, *, flip: bool, rescale: bool,
            latent_factor: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One example's image in [-1, 1] ``[H, W, 3]``, its latent validity mask ``[h, w, 1]`` and prompt prefix."""
    size_h, size_w = image.shape[:2]
    x = image.astype(np.float32) / 127.5 - 1.0
    if flip and rng.random() < 0.5:
        x = x[:, ::-1]
    pixel_mask = np.ones((size_h, size_w), np.float32)
    prefix = ""
    if rescale:
        size = min(size_h, size_w)
        if rng.random() < SHRINK_PROBABILITY:
            scale = int(rng.integers(size // 3, size + 1))
        else:
            scale = int(rng.integers(int(1.2 * size), int(1.4 * size) + 1))
        scale += scale % 2
        if scale < size:
            small = _resize(x, scale)
            canvas = np.zeros_like(x)  # 0 is mid-grey in [-1, 1]
            top = int(rng.integers(0, size_h - scale + 1))
            left = int(rng.integers(0, size_w - scale + 1))
            canvas[top : top + scale, left : left + scale] = small
            x = canvas
            pixel_mask = np.zeros_like(pixel_mask)
            pixel_mask[top : top + scale, left : left + scale] = 1.0
            if scale < 0.6 * size:
                prefix = FAR_PREFIXES[int(rng.integers(len(FAR_PREFIXES)))]
        elif scale > size:
            big = _resize(x, scale)
            top = int(rng.integers(0, scale - size_h + 1))
            left = int(rng.integers(0, scale - size_w + 1))
            x = big[top : top + size_h, left : left + size_w]
            prefix = NEAR_PREFIXES[int(rng.integers(len(NEAR_PREFIXES)))]
    # A latent cell counts only if every pixel it covers is image, not canvas.
    f = latent_factor
    cells = pixel_mask.reshape(size_h // f, f, size_w // f, f).min(axis=(1, 3))
    return np.ascontiguousarray(x), cells[..., None], prefix


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    channels = [np.asarray(Image.fromarray(x[..., c]).resize((size, size), Image.BILINEAR)) for c in range(x.shape[-1])]
    return np.stack(channels, axis=-1).astype(np.float32)


class AnchorBatches:
    """Training batches built from an anchor source (``len()`` and ``[i] -> {"image", "prompt"}``).

    Several concepts removed at once: ``source`` and ``concept`` are sequences, one anchor source per
    concept, and each example's prompts are built by its own concept. The concepts take turns
    (example ``k`` is concept ``k mod C``, through that concept's own permutation of its records), so
    each has an equal share of every batch, up to one row, whatever its anchor count. A record whose
    prompt names another concept's target or one of its aliases is left out ("a smiley on a plain
    background", an anchor of the striped style, would otherwise train the smiley to stay; "a circle
    on a stripy background", the smiley's, the stripes); :attr:`left_out` counts them per
    concept. A concept with nothing to preserve contributes no preservation example: its rows get
    ``keep_weight`` 0 (its keep prompt is its anchor prompt). Rescaling never applies to a memorized
    image's anchors, which are removed as drawn.
    """

    def __init__(
        self,
        source: Any,
        concept: Concept | Sequence[Concept],
        tokenize: Callable[[Sequence[str]], np.ndarray],
        *,
        seed: int,
        global_batch: int,
        latent_factor: int,
        flip: bool = True,
        rescale: bool = True,
        with_keep: bool = False,
        misspell: float = 0.0,
        paraphrase: float = 0.0,
        context: float = 0.0,
        vocabulary: Sequence[str] = (),
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        self.several = not isinstance(concept, Concept)
        self.concepts: tuple[Concept, ...] = tuple(concept) if self.several else (concept,)  # type: ignore[arg-type]
        self.sources = tuple(source) if self.several else (source,)
        if len(self.sources) != len(self.concepts):
            raise ValueError(f"{len(self.concepts)} concepts need as many anchor sources, got {len(self.sources)}")
        if any(len(s) == 0 for s in self.sources):
            raise ValueError("the anchor dataset is empty")
        if global_batch % process_count:
            raise ValueError(f"train.batch_size {global_batch} is not a multiple of the process count {process_count}")
        if with_keep and not any(c.preserve for c in self.concepts):
            raise ValueError("preserve.weight > 0 but the concept names no concept to preserve (preserve.concepts)")
        # Per concept, the patterns of every other concept's targets and aliases, and the records it trains on.
        self._others = [[word_pattern(t) for j, o in enumerate(self.concepts) if j != i for t in o.names]
                        for i in range(len(self.concepts))]
        # A run of one concept reads no record here.
        self.by_concept = [np.asarray([r for r in range(len(s))
                                       if not self._others[c] or not self._names_another_target(c, s[r]["prompt"])],
                                      np.int64) for c, s in enumerate(self.sources)]
        self.left_out = {c.target: len(s) - len(rows)
                         for c, s, rows in zip(self.concepts, self.sources, self.by_concept, strict=True)}
        empty = [t for t, rows in zip(self.left_out, self.by_concept, strict=True) if not len(rows)]
        if empty:
            raise ValueError(f"every anchor image of {empty[0]!r} names another concept's target; give it anchor "
                             "prompts that do not")
        self.tokenize = tokenize
        self.seed, self.global_batch, self.latent_factor = seed, global_batch, latent_factor
        self.flip, self.rescale, self.with_keep = flip, rescale, with_keep
        # Robust ablation's augmentation: a fraction of target prompts misspell the target's word,
        # never as the misspelling attack does (those variants stay unseen).
        self.misspell = misspell
        # ... and a fraction names it by one of its aliases, a concept's other words for it.
        self.paraphrase = paraphrase
        if paraphrase and not all(c.aliases for c in self.concepts):
            raise ValueError("paraphrase augmentation needs every concept's aliases")
        # ... and a fraction puts one to three random words of ``vocabulary`` before every prompt of the
        # example (a prompt search's prefixes), never a word of any concept's names: "striped" before a
        # smiley's anchor prompt would teach the stripes to stay, as an anchor naming them would.
        self.context = context
        named = {word.lower() for c in self.concepts for name in c.names for word in name.split()}
        self.vocabulary = tuple(w for w in vocabulary if w.lower() not in named)
        if context and not self.vocabulary:
            raise ValueError("context augmentation needs vocabulary words that name no target")
        self.words = tuple(target_word(c.targets, c.anchor) for c in self.concepts)
        self.attack_variants = tuple(tuple(misspellings(w, extended=True).values()) for w in self.words)
        # Whether a keep weight per row is needed: only when some concept has nothing to preserve.
        self.keep_weights = with_keep and not all(c.preserve for c in self.concepts)
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.by_concept)

    def _names_another_target(self, c: int, prompt: str | bytes) -> bool:
        """Whether an anchor prompt of concept ``c`` names another concept's target or alias: its example would
        teach that target to stay (the teacher draws it), so it is left out of a run of several."""
        text = prompt.decode("utf-8") if isinstance(prompt, bytes) else prompt
        return any(p.search(text) for p in self._others[c])

    @functools.lru_cache(maxsize=16)  # noqa: B019  (a few epochs' permutations; the object lives for the run)
    def _permutation(self, epoch: int, concept: int) -> np.ndarray:
        # A run of one concept draws its permutations from (seed, 1, epoch); several, one stream per concept.
        key = [self.seed, 1, epoch, concept] if self.several else [self.seed, 1, epoch]
        return np.random.default_rng(key).permutation(len(self.by_concept[concept]))

    def example(self, k: int) -> dict[str, Any]:
        """Global example ``k``: the augmented image, its mask, its prompts and (several concepts) which concept."""
        # Concepts take turns (example k is concept k mod C), each through its own permutation of
        # its records: every concept gets 1/C of the examples, whatever its anchor count.
        c, j = k % len(self.concepts), k // len(self.concepts)
        mine = self.by_concept[c]
        r = int(mine[int(self._permutation(j // len(mine), c)[j % len(mine)])])
        concept = self.concepts[c]
        record = self.sources[c][r]
        prompt = record["prompt"]
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        rng = np.random.default_rng([self.seed, 2, k])
        rescale = self.rescale and not (self.several and concept.kind == "memorization")
        image, mask, prefix = augment(np.asarray(record["image"]), rng, flip=self.flip, rescale=rescale,
                                      latent_factor=self.latent_factor)
        target = concept.target_prompt(prompt, k)
        paraphrased = False
        if self.paraphrase:
            # A stream of its own, like the misspellings'.
            prng = np.random.default_rng([self.seed, 4, k])
            if prng.random() < self.paraphrase:
                target = concept.target_prompt(prompt, k, concept.aliases[int(prng.integers(len(concept.aliases)))])
                paraphrased = True
        if self.misspell and not paraphrased:
            # A stream of its own, so turning this on leaves every other draw of the run unchanged.
            mrng = np.random.default_rng([self.seed, 3, k])
            if mrng.random() < self.misspell:
                word = self.words[c]
                target = replace_word(target, word, random_misspelling(word, mrng, self.attack_variants[c]))
        if self.context:
            crng = np.random.default_rng([self.seed, 5, k])
            if crng.random() < self.context:
                picks = crng.integers(len(self.vocabulary), size=int(crng.integers(1, 4)))
                prefix = "".join(self.vocabulary[int(i)] + " " for i in picks) + prefix
        out = {
            "image": image,
            "mask": mask,
            "target": prefix + target,
            "anchor": prefix + prompt,
            "concept": c,
        }
        if self.with_keep:
            if concept.preserve:
                keep = concept.preserve[k % len(concept.preserve)]
                out["keep"] = prefix + concept.keep_prompt(prompt, keep, k)
            else:
                out["keep"] = prefix + prompt
            out["keep_weight"] = 1.0 if concept.preserve else 0.0
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of ``step``, tokenized."""
        first = step * self.global_batch + self.offset
        examples = [self.example(first + j) for j in range(self.local_batch)]
        out = {
            "image": np.stack([e["image"] for e in examples]),
            "mask": np.stack([e["mask"] for e in examples]),
            "target_ids": self.tokenize([e["target"] for e in examples]),
            "anchor_ids": self.tokenize([e["anchor"] for e in examples]),
        }
        if self.with_keep:
            out["keep_ids"] = self.tokenize([e["keep"] for e in examples])
        if self.keep_weights:
            out["keep_weight"] = np.asarray([e["keep_weight"] for e in examples], np.float32)
        return out

    def prompts(self, step: int) -> list[tuple[str, str]]:
        """(target, anchor) prompt pairs of this process's rows of ``step``, for logs and tests."""
        first = step * self.global_batch + self.offset
        return [(e["target"], e["anchor"]) for e in (self.example(first + j) for j in range(self.local_batch))]
