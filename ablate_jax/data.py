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

from ablate_jax.concepts import Concept, misspellings, random_misspelling, replace_word, target_word

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
    """Training batches built from an anchor source (``len()`` and ``[i] -> {"image", "prompt"}``)."""

    def __init__(
        self,
        source: Any,
        concept: Concept,
        tokenize: Callable[[Sequence[str]], np.ndarray],
        *,
        seed: int,
        global_batch: int,
        latent_factor: int,
        flip: bool = True,
        rescale: bool = True,
        with_keep: bool = False,
        misspell: float = 0.0,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        if len(source) == 0:
            raise ValueError("the anchor dataset is empty")
        if global_batch % process_count:
            raise ValueError(f"train.batch_size {global_batch} is not a multiple of the process count {process_count}")
        if with_keep and not concept.preserve:
            raise ValueError("preserve.weight > 0 but the concept names no concept to preserve (preserve.concepts)")
        self.source, self.concept, self.tokenize = source, concept, tokenize
        self.seed, self.global_batch, self.latent_factor = seed, global_batch, latent_factor
        self.flip, self.rescale, self.with_keep = flip, rescale, with_keep
        # Robust ablation's augmentation: a fraction of target prompts misspell the target's word,
        # never as the misspelling attack does (those variants stay unseen).
        self.misspell = misspell
        self.word = target_word(concept.targets, concept.anchor)
        self.attack_variants = tuple(misspellings(self.word, extended=True).values())
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch

    def __len__(self) -> int:
        return len(self.source)

    @functools.lru_cache(maxsize=4)  # noqa: B019  (a few epochs' permutations; the object lives for the run)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.source))

    def example(self, k: int) -> dict[str, Any]:
        """Global example ``k``: the augmented image, its mask and its prompts."""
        n = len(self.source)
        record = self.source[int(self._permutation(k // n)[k % n])]
        prompt = record["prompt"]
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        rng = np.random.default_rng([self.seed, 2, k])
        image, mask, prefix = augment(np.asarray(record["image"]), rng, flip=self.flip, rescale=self.rescale,
                                      latent_factor=self.latent_factor)
        target = self.concept.target_prompt(prompt, k)
        if self.misspell:
            # A stream of its own, so turning this on leaves every other draw of the run unchanged.
            mrng = np.random.default_rng([self.seed, 3, k])
            if mrng.random() < self.misspell:
                target = replace_word(target, self.word, random_misspelling(self.word, mrng, self.attack_variants))
        out = {
            "image": image,
            "mask": mask,
            "target": prefix + target,
            "anchor": prefix + prompt,
        }
        if self.with_keep:
            keep = self.concept.preserve[k % len(self.concept.preserve)]
            out["keep"] = prefix + self.concept.keep_prompt(prompt, keep, k)
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
        return out

    def prompts(self, step: int) -> list[tuple[str, str]]:
        """(target, anchor) prompt pairs of this process's rows of ``step``, for logs and tests."""
        first = step * self.global_batch + self.offset
        return [(e["target"], e["anchor"]) for e in (self.example(first + j) for j in range(self.local_batch))]
