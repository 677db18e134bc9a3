"""What is trained: parameter groups, the trainable/frozen split, and the optimizer (docs/design.md, "Parameter groups and the optimizer").

Parameters are addressed by their slash-joined path in the pipeline tree
(``unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel``). A group is a
regex over those paths. The split keeps the selected leaves in a small flat ``trainable`` dict
(the train state) and leaves the full pretrained tree untouched as the frozen base, so the
student is ``merge(base, trainable)`` and the frozen teacher is ``base`` itself: no second copy
of the model, and frozen leaves have no optimizer state.

The ``embedding`` group trains only the rows of the token embedding that belong to the target's
tokens: the trainable leaf holds just those rows and :func:`merge` writes them back into the
base matrix, so every other row is the pretrained one bit for bit (weight decay included).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

GROUPS: dict[str, str] = {
    "xattn_kv": r"^unet/.*/attn2/to_[kv]/",
    "xattn": r"^unet/.*/attn2/",
    "attn": r"^unet/.*/attn[12]/",
    "full": r"^unet/",
    "embedding": r"^text_encoder/.*/token_embedding/embedding$",
}
EMBEDDING_PATH_RE = GROUPS["embedding"]
ROWS_SUFFIX = "@rows"  # marks a trainable leaf that holds selected rows of a base matrix


class ParamsError(ValueError):
    """A parameter group that selects nothing, or an unknown one."""


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{"unet": {"a": {"kernel": x}}}`` -> ``{"unet/a/kernel": x}``."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def select(params: Mapping[str, Any], group: str) -> list[str]:
    """Paths of the leaves a group selects, sorted."""
    if group not in GROUPS:
        raise ParamsError(f"unknown parameter group {group!r}; choose one of {', '.join(GROUPS)}")
    pattern = re.compile(GROUPS[group])
    paths = sorted(p for p in flatten(params) if pattern.search(p))
    if not paths:
        raise ParamsError(f"parameter group {group!r} selects no parameter of this model")
    return paths


def mask(params: Mapping[str, Any], group: str) -> dict[str, Any]:
    """A tree of booleans shaped like ``params``: True where the group trains."""
    chosen = set(select(params, group))
    return unflatten({p: p in chosen for p in flatten(params)})


@dataclasses.dataclass(frozen=True)
class Selection:
    """The trainable part of a pipeline's parameters: whole leaves, or rows of one embedding."""

    group: str
    paths: tuple[str, ...]
    rows: tuple[int, ...] = ()  # embedding group only: token ids whose rows train

    def split(self, params: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The trainable leaves (a flat dict), copied out of ``params``."""
        flat = flatten(params)
        if self.rows:
            (path,) = self.paths
            return {path + ROWS_SUFFIX: jnp.asarray(flat[path])[np.asarray(self.rows)]}
        return {p: jnp.asarray(flat[p]) for p in self.paths}

    def merge(self, base: Mapping[str, Any], trainable: Mapping[str, jax.Array]) -> dict[str, Any]:
        """``base`` with the trainable leaves (or rows) written in; works under jit and grad."""
        flat = flatten(base)
        for key, value in trainable.items():
            if key.endswith(ROWS_SUFFIX):
                path = key[: -len(ROWS_SUFFIX)]
                matrix = jnp.asarray(flat[path])
                flat[path] = matrix.at[np.asarray(self.rows)].set(value.astype(matrix.dtype))
            else:
                flat[key] = value.astype(flat[key].dtype)
        return unflatten(flat)

    @property
    def trains_text_encoder(self) -> bool:
        return any(p.startswith("text_encoder/") for p in self.paths)

    def count(self, params: Mapping[str, Any]) -> int:
        """Number of trainable scalars."""
        return sum(int(np.prod(v.shape)) for v in self.split(params).values())


def frozen_for_compute(params: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """The frozen base as the train step reads it: with a 16-bit compute dtype, every float matrix,
    kernel and embedding (2 or more dimensions) held in that dtype.

    The modules cast these to the compute dtype at every use anyway, so the step computes the same
    values from half the bytes; vectors (norm scales, biases) stay as they are. With float32
    compute nothing changes. The trainable leaves keep their float32 master copy in the train
    state (:meth:`Selection.merge` casts them where they are used).
    """
    dtype = jnp.dtype(dtype)
    if dtype.itemsize >= 4:
        return dict(params)

    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 and x.dtype.itemsize > dtype.itemsize:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, dict(params))


def selection(params: Mapping[str, Any], group: str, target_token_ids: Sequence[int] = ()) -> Selection:
    """The :class:`Selection` of ``group``; ``embedding`` needs the target's token ids."""
    paths = tuple(select(params, group))
    if group != "embedding":
        return Selection(group, paths)
    rows = tuple(sorted(set(int(i) for i in target_token_ids)))
    if not rows:
        raise ParamsError("the embedding group needs at least one target token that the anchor does not share")
    if len(paths) != 1:
        raise ParamsError(f"expected one token embedding, found {len(paths)}: {', '.join(paths)}")
    return Selection(group, paths, rows)


def target_token_ids(tokenizer: Any, targets: Sequence[str], anchor: str) -> list[int]:
    """Tokens of the targets that the anchor does not use (moving ``cat`` would ablate every cat).

    Special tokens (start, end, padding) are never included.
    """
    special = set(tokenizer.all_special_ids)
    anchor_ids = set(tokenizer(anchor, add_special_tokens=False).input_ids) if anchor else set()
    ids: list[int] = []
    for target in targets:
        for i in tokenizer(target, add_special_tokens=False).input_ids:
            if i not in special and i not in anchor_ids and i not in ids:
                ids.append(i)
    return ids


def target_token_ids_of(tokenizer: Any, concept: Any) -> list[int]:
    """:func:`target_token_ids` of one concept, or of several together (each against its own anchor)."""
    group = concept if isinstance(concept, (tuple, list)) else (concept,)
    ids: list[int] = []
    for c in group:
        ids += [i for i in target_token_ids(tokenizer, c.targets, c.anchor) if i not in ids]
    return ids


def _clipped_adamw(learning_rate: float, weight_decay: float, clip_norm: float, b1: float, b2: float,
                   eps: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def optimizer(learning_rate: float, weight_decay: float = 1e-2, clip_norm: float = 1.0,
              b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW at a constant rate after global-norm clipping; non-finite updates are skipped and counted.

    The learning rate and weight decay are values in the optimizer state, set by ``init``, not
    constants of the compiled step: runs that differ only in them (a sweep over rates, the
    trade-off grid) share one program, in a process and in the persistent compilation cache.
    ``apply_if_finite`` keeps the parameters at their last finite values when a step produces a
    NaN or infinite gradient, so the training loop can stop with the last good state intact.
    """
    inject = optax.inject_hyperparams(_clipped_adamw, static_args=("clip_norm", "b1", "b2", "eps"))
    tx = inject(learning_rate=learning_rate, weight_decay=weight_decay, clip_norm=clip_norm, b1=b1, b2=b2, eps=eps)
    return optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
