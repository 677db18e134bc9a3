"""Name and layout conversion between PyTorch state dicts and the project's Flax params.

PyTorch names (``down_blocks.0.attentions.1.proj_in.weight``) map to Flax paths by joining
every integer segment to the segment before it (``down_blocks_0/attentions_1/proj_in``) and
naming the leaf after the Flax parameter that receives it (``kernel``, ``scale``,
``embedding``, ``bias`` or the parameter's own name). Layouts: a convolution weight
``[O, I, kh, kw]`` becomes an ``[kh, kw, I, O]`` kernel, a linear weight ``[O, I]`` an
``[I, O]`` kernel. Both directions are exact (transposes only), so round trips are
bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

Params = dict[str, Any]

# Module names that end in "_<digits>" in PyTorch itself, so the reverse mapping must not
# read their suffix as a list index.
_TORCH_NAMES_WITH_DIGIT_SUFFIX = frozenset({"linear_1", "linear_2"})

# Buffers that some checkpoints carry and that are not parameters.
_IGNORED_TORCH_KEYS = re.compile(r"(^|\.)(position_ids|num_batches_tracked)$")

# Attention names written by diffusers before 0.14 (VAE mid-block attention).
_LEGACY_RENAMES = (
    (re.compile(r"\.query\.(weight|bias)$"), r".to_q.\1"),
    (re.compile(r"\.key\.(weight|bias)$"), r".to_k.\1"),
    (re.compile(r"\.value\.(weight|bias)$"), r".to_v.\1"),
    (re.compile(r"\.proj_attn\.(weight|bias)$"), r".to_out.0.\1"),
)


class ConversionError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


def _torch_module_path(key: str) -> tuple[tuple[str, ...], str]:
    """``a.0.b.weight`` -> ((``a_0``, ``b``), ``weight``)."""
    parts = key.split(".")
    merged: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and merged:
            merged[-1] = f"{merged[-1]}_{part}"
        else:
            merged.append(part)
    return tuple(merged), parts[-1]


def _contiguous(value: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray turns a 0-d array (e.g. CLIP's logit_scale) into shape (1,).
    return np.require(value, requirements="C")


def _torch_layout(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf (kernels are stored transposed)."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax_leaf(value: np.ndarray, leaf: str, expected_shape: tuple[int, ...], name: str) -> np.ndarray:
    given = tuple(value.shape)
    if leaf == "kernel":
        if value.ndim == 4 and len(expected_shape) == 2 and value.shape[2:] == (1, 1):
            # A 1x1 convolution stored where the Flax module uses a dense layer.
            value = value[:, :, 0, 0]
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
    if tuple(value.shape) != tuple(expected_shape):
        raise ConversionError(
            f"{name}: checkpoint shape {given} does not fit the model's {_torch_layout(tuple(expected_shape), leaf)}"
        )
    return _contiguous(value)


def torch_to_flax(
    tensors: Mapping[str, np.ndarray],
    abstract_params: Params,
    *,
    what: str = "model",
) -> Params:
    """Converts a PyTorch-named state dict (NumPy arrays) into a Flax params tree.

    ``abstract_params`` (e.g. from ``jax.eval_shape``) fixes the expected names and shapes;
    every model parameter must be present and every tensor used, or ConversionError names it.
    """
    expected = {"/".join(k): v for k, v in traverse_util.flatten_dict(abstract_params).items()}
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if _IGNORED_TORCH_KEYS.search(key):
            continue
        for pattern, repl in _LEGACY_RENAMES:
            key = pattern.sub(repl, key)
        module, leaf = _torch_module_path(key)
        prefix = "/".join(module)
        if leaf == "weight":
            candidates = [f"{prefix}/{n}" for n in ("kernel", "scale", "embedding")]
        else:
            candidates = [f"{prefix}/{leaf}" if prefix else leaf]
        match = [c for c in candidates if c in expected]
        if not match:
            raise ConversionError(f"{what}: unexpected tensor {key!r} (no parameter {candidates[0]!r} in the model)")
        path = match[0]
        if path in out:
            raise ConversionError(f"{what}: tensor {key!r} given twice")
        out[path] = _to_flax_leaf(np.asarray(value), path.rsplit("/", 1)[-1], expected[path].shape, f"{what}: {key}")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ConversionError(
            f"{what}: missing tensor for parameter {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for path, value in out.items():
        want = expected[path].dtype
        if value.dtype != want:
            out[path] = value.astype(want)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """(``down_blocks_0``, ``resnets_1``, ``conv1``, ``kernel``) -> ``down_blocks.0.resnets.1.conv1.weight``."""
    parts: list[str] = []
    for segment in path[:-1]:
        m = re.fullmatch(r"(.+)_(\d+)", segment)
        if m and segment not in _TORCH_NAMES_WITH_DIGIT_SUFFIX:
            parts.extend(m.groups())
        else:
            parts.append(segment)
    leaf = path[-1]
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def flax_to_torch(params: Params) -> dict[str, np.ndarray]:
    """Converts a Flax params tree into a PyTorch-named state dict of NumPy arrays."""
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(jax.device_get(value))
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        key = flax_path_to_torch_key(path)
        if key in out:
            raise ConversionError(f"two parameters map to the PyTorch name {key!r}")
        out[key] = _contiguous(value)
    return out


def with_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Puts ``prefix.`` before every key that does not already start with it.

    transformers >= 5 saves ``CLIPTextModel`` without the ``text_model.`` level (and
    ``CLIPVisionModel`` without ``vision_model.``) that older checkpoints and these modules use.
    """
    head = prefix.rstrip(".") + "."
    return {k if k.startswith(head) else head + k: v for k, v in tensors.items()}
