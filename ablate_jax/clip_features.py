"""CLIP embeddings of images and texts, unit-norm, one compiled program per evaluator.

Shared by evaluation (scores, accuracies, KID) and by the memorization measure that anchor
generation uses to drop copies, so neither needs the other.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ablate_jax.models.loading import CLIP


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
    texts = list(texts)
    # Padded to a multiple of 8 texts, so a few compiled shapes serve every call.
    padded = texts + [""] * (-len(texts) % 8)
    ids = tok(padded, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np")
    return np.asarray(_text_fn(clip)(clip.params, np.asarray(ids.input_ids, np.int32)))[: len(texts)]
