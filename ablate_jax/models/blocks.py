"""Convolutional building blocks shared by the UNet and the VAE (channels-last, NHWC).

Every module names its parameters after the PyTorch modules it stands for, so that
``ablate_jax.models.convert`` maps checkpoints onto them by name alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
    "relu": nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` in a diffusers config (case-insensitive)."""
    fn = _ACTIVATIONS.get(name.lower())
    if fn is None:
        raise ValueError(f"unsupported activation function {name!r} (supported: {sorted(_ACTIVATIONS)})")
    return fn


def group_norm(num_groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """GroupNorm over the last (channel) axis; statistics are always taken in float32."""
    # The two-pass variance keeps parity with PyTorch when activations have a large mean.
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class Conv2D(nn.Module):
    """A 2-D convolution with ``nn.Conv``'s parameters (``kernel`` [kh, kw, in, out], ``bias``).

    Inputs smaller than the kernel (a 3x3 convolution on the 2x2 bottom level of a small UNet)
    are computed as one matrix multiply over the padded input's patches. XLA rewrites such a
    convolution with its operands swapped, which its CPU backend runs through a generic loop
    10 to 15 times slower than the multiply, forward and backward alike. Everything else goes
    to ``lax.conv_general_dilated`` exactly as ``nn.Conv`` calls it.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        (pt, pb), (pl, pr) = self.padding
        if self.strides == 1 and k > 1 and (x.shape[1] < k or x.shape[2] < k):
            xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
            out_h, out_w = xp.shape[1] - k + 1, xp.shape[2] - k + 1
            # Patches in the kernel's (row, column, channel) order, so the kernel reshapes in place.
            cols = jnp.concatenate(
                [xp[:, i:i + out_h, j:j + out_w, :] for i in range(k) for j in range(k)], axis=-1)
            y = jnp.dot(cols, kernel.reshape(k * k * kernel.shape[2], self.features))
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.strides, self.strides), self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def conv(
    features: int,
    kernel: int,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str | None,
    *,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> Conv2D:
    """A 2-D convolution padded like PyTorch's ``Conv2d(padding=(kernel - 1) // 2)`` unless told otherwise."""
    if padding is None:
        padding = (kernel - 1) // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return Conv2D(features, kernel, stride, tuple(map(tuple, padding)), dtype=dtype, param_dtype=param_dtype,
                  name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice with an optional additive time embedding and a 1x1 shortcut.

    ``__call__(x [B, H, W, Cin], temb [B, T] | None) -> [B, H, W, out_channels]``. The
    ``time_emb_proj`` layer exists only when the block is called with a ``temb``.
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = activation(self.act_fn)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = act(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(act(temb))
            h = h + t[:, None, None, :]
        groups_out = self.groups if self.groups_out is None else self.groups_out
        h = act(group_norm(groups_out, self.eps, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return (x.astype(h.dtype) + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """A stride-2 3x3 convolution (parameters under ``conv``).

    ``padding`` is PyTorch's symmetric padding; 0 means the VAE encoder's variant, which pads
    only the bottom and right edge by one pixel before an unpadded convolution.
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding=pad)(x)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows of PyTorch's ``interpolate(mode="nearest", size=out_size)``, float32 arithmetic included."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour resize of ``[B, H, W, C]`` by 2, or to ``output_size`` (H, W) when given."""
    _, h, w, _ = x.shape
    if output_size is None or tuple(output_size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    out_h, out_w = output_size
    x = jnp.take(x, jnp.asarray(_nearest_indices(h, out_h)), axis=1)
    return jnp.take(x, jnp.asarray(_nearest_indices(w, out_w)), axis=2)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to a given size) followed by a 3x3 convolution (``conv``)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, output_size)
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)
