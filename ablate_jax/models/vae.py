"""The Stable Diffusion KL autoencoder in Flax, channels-last.

Parameter names follow the PyTorch state dict of diffusers' ``AutoencoderKL`` (see
``ablate_jax.models.convert``), and ``from_config`` reads its ``config.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ablate_jax.models.attention import Attention
from ablate_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, activation, conv, group_norm

Dtype = Any

_EPS = 1e-6  # every normalisation in the autoencoder

# Config keys that do not change what encode/decode compute (pipeline metadata).
_IGNORED_KEYS = frozenset({"sample_size", "force_upcast", "latents_mean", "latents_std"})

_FIELD_KEYS = frozenset(
    {
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "act_fn",
        "latent_channels",
        "norm_num_groups",
        "scaling_factor",
        "shift_factor",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    }
)


class _VaeBlock(nn.Module):
    """Fields shared by the autoencoder's blocks (not used on its own)."""

    groups: int = 32
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, channels: int, name: str) -> ResnetBlock2D:
        return ResnetBlock2D(
            channels,
            groups=self.groups,
            eps=_EPS,
            act_fn=self.act_fn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


class DownEncoderBlock2D(_VaeBlock):
    """Resnets without time embedding, then an optional downsampler padded bottom/right only."""

    out_channels: int = 128
    num_layers: int = 2
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = self.resnet(self.out_channels, f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels, padding=0, dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0"
            )(x)
        return x


class UpDecoderBlock2D(_VaeBlock):
    """Resnets without time embedding, then an optional nearest-2x upsampler."""

    out_channels: int = 128
    num_layers: int = 3
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = self.resnet(self.out_channels, f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")(x)
        return x


class UNetMidBlock2D(_VaeBlock):
    """Resnet, single-head spatial self-attention (GroupNorm + residual), resnet."""

    add_attention: bool = True
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = self.resnet(channels, "resnets_0")(x)
        if self.add_attention:
            x = Attention(
                heads=1,
                head_dim=channels,
                qkv_bias=True,
                norm_num_groups=self.groups,
                norm_eps=_EPS,
                residual_connection=True,
                attention_implementation=self.attention_implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="attentions_0",
            )(x)
        return self.resnet(channels, "resnets_1")(x)


class Encoder(nn.Module):
    """Image ``[B, H, W, C]`` -> ``[B, H / 2^(n-1), W / 2^(n-1), 2 * latent_channels]`` moments."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    groups: int
    act_fn: str
    mid_block_add_attention: bool = True
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(groups=self.groups, act_fn=self.act_fn, **kw)
        channels = self.block_out_channels
        x = conv(channels[0], 3, name="conv_in", **kw)(x)
        for i, c in enumerate(channels):
            x = DownEncoderBlock2D(
                out_channels=c,
                num_layers=self.layers_per_block,
                add_downsample=i < len(channels) - 1,
                name=f"down_blocks_{i}",
                **block,
            )(x)
        x = UNetMidBlock2D(
            add_attention=self.mid_block_add_attention,
            attention_implementation=self.attention_implementation,
            name="mid_block",
            **block,
        )(x)
        # The output activation is SiLU whatever act_fn says.
        x = nn.silu(group_norm(self.groups, _EPS, name="conv_norm_out", **kw)(x))
        return conv(2 * self.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latent ``[B, h, w, latent_channels]`` -> image ``[B, h * 2^(n-1), w * 2^(n-1), out_channels]``."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    act_fn: str
    mid_block_add_attention: bool = True
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(groups=self.groups, act_fn=self.act_fn, **kw)
        channels = tuple(reversed(self.block_out_channels))
        x = conv(channels[0], 3, name="conv_in", **kw)(z)
        x = UNetMidBlock2D(
            add_attention=self.mid_block_add_attention,
            attention_implementation=self.attention_implementation,
            name="mid_block",
            **block,
        )(x)
        for i, c in enumerate(channels):
            x = UpDecoderBlock2D(
                out_channels=c,
                num_layers=self.layers_per_block + 1,
                add_upsample=i < len(channels) - 1,
                name=f"up_blocks_{i}",
                **block,
            )(x)
        x = nn.silu(group_norm(self.groups, _EPS, name="conv_norm_out", **kw)(x))
        return conv(self.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode`` images in [-1, 1] to a diagonal Gaussian, ``decode`` latents to images.

    ``encode(x [B, H, W, in_channels]) -> (mean, logvar)``, each ``[B, h, w, latent_channels]``
    with ``logvar`` clipped to [-30, 20]; ``decode(z [B, h, w, latent_channels]) -> [B, H, W,
    out_channels]``. Latents are unscaled: multiply by ``scaling_factor`` before the UNet and
    divide before ``decode``. ``__call__`` decodes the posterior mean (used for init).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> AutoencoderKL:
        """Builds the model from diffusers' ``config.json`` dict; ``kwargs`` set other fields (dtype, ...).

        Raises ValueError naming the key and value of any setting this model does not implement.
        """
        fields: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key not in _FIELD_KEYS:
                raise ValueError(f"unsupported VAE config key: {key}={value!r}")
            fields[key] = tuple(value) if isinstance(value, list) else value
        n = len(fields.get("block_out_channels", cls.block_out_channels))
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = fields.get(key, getattr(cls, key))
            if len(types) != n:
                raise ValueError(f"unsupported VAE config: {key}={list(types)!r} (needs {n} entries)")
            for t in types:
                if t != allowed:
                    raise ValueError(f"unsupported VAE config: {key} contains {t!r} (supported: {allowed!r})")
        if not isinstance(fields.get("layers_per_block", cls.layers_per_block), int):
            raise ValueError(f"unsupported VAE config: layers_per_block={fields['layers_per_block']!r}")
        activation(fields.get("act_fn", cls.act_fn))
        fields.update(kwargs)
        return cls(**fields)

    def setup(self) -> None:
        common = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            act_fn=self.act_fn,
            mid_block_add_attention=self.mid_block_add_attention,
            attention_implementation=self.attention_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, 1, name=None, **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, 1, name=None, **kw)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior ``(mean, logvar)`` of images ``x`` ``[B, H, W, C]`` in [-1, 1]."""
        h = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images ``[B, H, W, out_channels]`` (about [-1, 1]) from unscaled latents ``z``."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        """Freshly initialised params (no ``{'params': ...}`` wrapper), from a tiny dummy image."""
        size = 2 ** (len(self.block_out_channels) - 1)
        # Compiled, because initialising op by op is several times slower.
        return jax.jit(self.init)(rng, jnp.zeros((1, size, size, self.in_channels), jnp.float32))["params"]
