"""Measures of what an ablation removed and what it kept (DESIGN.md section 1.8).

- CLIP score: ``2.5 * max(cos(image, text), 0)`` with the text "A photo depicts {concept}";
- CLIP accuracy: the fraction of images whose score for a set's concept beats the score for
  the concept it is compared with (the anchor, or for the anchor set the target);
- KID: unbiased polynomial-kernel MMD between two sets of CLIP image features;
- zero-shot classification among a list of concepts (used to check the toy world).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ablate_jax.models.loading import CLIP

EVAL_TEMPLATE = "A photo depicts {}"


@functools.lru_cache(maxsize=8)
def _image_fn(clip: CLIP):
    model, size = clip.model, clip.image_size
    mean, std = jnp.asarray(clip.image_mean), jnp.asarray(clip.image_std)

    @jax.jit
    def embed(params, images):  # images uint8 [B, H, W, 3]
        x = images.astype(jnp.float32) / 255.0
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bicubic")
        feats = model.apply({"params": params}, (x - mean) / std, method=model.get_image_features)
        return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

    return embed


@functools.lru_cache(maxsize=8)
def _text_fn(clip: CLIP):
    model = clip.model

    @jax.jit
    def embed(params, ids):
        feats = model.apply({"params": params}, ids, method=model.get_text_features)
        return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

    return embed


def image_embeddings(clip: CLIP, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Unit-norm CLIP image embeddings ``[N, P]`` of uint8 images ``[N, H, W, 3]``."""
    fn = _image_fn(clip)
    return np.concatenate([np.asarray(fn(clip.params, images[i : i + batch])) for i in range(0, len(images), batch)])


def text_embeddings(clip: CLIP, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm CLIP text embeddings ``[N, P]``."""
    tok = clip.tokenizer
    ids = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np")
    return np.asarray(_text_fn(clip)(clip.params, np.asarray(ids.input_ids, np.int32)))


def concept_text(concept: str) -> str:
    return EVAL_TEMPLATE.format(concept)


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """``2.5 * max(cos, 0)`` for every image and text: ``[N_images, N_texts]``."""
    return 2.5 * np.maximum(image_emb @ text_emb.T, 0.0)


def clip_accuracy(image_emb: np.ndarray, concept_emb: np.ndarray, other_emb: np.ndarray) -> float:
    """Fraction of images that score higher for the concept than for the other concept (ties count as misses)."""
    s = clip_scores(image_emb, np.stack([concept_emb, other_emb]))
    return float(np.mean(s[:, 0] > s[:, 1]))


def zero_shot(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Index of the best-matching class text for each image: ``[N]``."""
    return np.argmax(image_emb @ class_emb.T, axis=1)


def kid(x: np.ndarray, y: np.ndarray, subsets: int = 50, subset_size: int = 100, seed: int = 0) -> float:
    """Kernel inception distance between feature sets ``x [N, D]`` and ``y [M, D]``.

    The unbiased MMD^2 with the cubic polynomial kernel ``(x.y / D + 1)^3``, averaged over random
    subsets of ``min(subset_size, N, M)`` rows of each.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        total += (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(total / subsets)
