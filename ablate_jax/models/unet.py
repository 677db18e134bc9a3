"""The Stable Diffusion conditional UNet (SD 1.x / 2.x family) in Flax, channels-last.

Parameter names follow the PyTorch state dict of diffusers' ``UNet2DConditionModel`` (see
``ablate_jax.models.convert``), and ``from_config`` reads its ``config.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ablate_jax.models.attention import Transformer2DModel
from ablate_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, activation, conv, group_norm

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Config keys that must keep these values: other values select features this model lacks.
_REQUIRED_VALUES: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}

# Config keys that never reach the layers this model builds (they only configure class or
# addition embeddings, which must be off, or block types that are unsupported), or are metadata.
_IGNORED_KEYS = frozenset(
    {
        "sample_size",
        "resnet_skip_time_act",
        "resnet_out_scale_factor",
        "addition_time_embed_dim",
        "addition_embed_type_num_heads",
        "projection_class_embeddings_input_dim",
        "class_embeddings_concat",
        "mid_block_only_cross_attention",
        "cross_attention_norm",
    }
)

# Config keys read into module fields.
_FIELD_KEYS = frozenset(
    {
        "in_channels",
        "out_channels",
        "center_input_sample",
        "flip_sin_to_cos",
        "freq_shift",
        "down_block_types",
        "up_block_types",
        "only_cross_attention",
        "block_out_channels",
        "layers_per_block",
        "downsample_padding",
        "mid_block_scale_factor",
        "act_fn",
        "norm_num_groups",
        "norm_eps",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "attention_head_dim",
        "use_linear_projection",
        "upcast_attention",
        "time_embedding_dim",
        "time_embedding_act_fn",
        "timestep_post_act",
        "conv_in_kernel",
        "conv_out_kernel",
    }
)


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding ``[B] -> [B, dim]`` in float32: sin then cos halves (cos first if flipped)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1``, activation, ``linear_2`` (and an optional activation after it)."""

    features: int
    act_fn: str = "silu"
    post_act_fn: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = activation(self.act_fn)(nn.Dense(self.features, name="linear_1", **kw)(x))
        x = nn.Dense(self.features, name="linear_2", **kw)(x)
        if self.post_act_fn is not None:
            x = activation(self.post_act_fn)(x)
        return x


class _TransformerHost(nn.Module):
    """Fields shared by the blocks that hold resnets and spatial transformers (not used on its own)."""

    heads: int = 8
    transformer_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    stop_sot_kv_grad: bool = False
    attention_implementation: str | None = None
    remat_attention: bool = False
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, channels: int, name: str, output_scale_factor: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(
            channels,
            groups=self.groups,
            eps=self.eps,
            act_fn=self.act_fn,
            output_scale_factor=output_scale_factor,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def transformer(self, channels: int, name: str) -> Transformer2DModel:
        cls = nn.remat(Transformer2DModel) if self.remat_attention else Transformer2DModel
        return cls(
            heads=self.heads,
            head_dim=channels // self.heads,
            num_layers=self.transformer_layers,
            norm_num_groups=self.groups,
            use_linear_projection=self.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention,
            stop_sot_kv_grad=self.stop_sot_kv_grad,
            attention_implementation=self.attention_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


class DownBlock2D(_TransformerHost):
    """``DownBlock2D`` / ``CrossAttnDownBlock2D`` (``has_attention``): resnets (each followed by a
    transformer when attending), then an optional stride-2 downsampler.

    Returns the output and the tuple of skip activations the up path consumes.
    """

    out_channels: int = 320
    num_layers: int = 2
    has_attention: bool = True
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(self.out_channels, f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self.transformer(self.out_channels, f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock2D(_TransformerHost):
    """``UpBlock2D`` / ``CrossAttnUpBlock2D`` (``has_attention``): each resnet takes the running
    activation concatenated with the last remaining skip; then an optional upsampler.
    """

    out_channels: int = 320
    num_layers: int = 3
    has_attention: bool = True
    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: Sequence[jax.Array],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self.resnet(self.out_channels, f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self.transformer(self.out_channels, f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(_TransformerHost):
    """Resnet, then (transformer, resnet) once; resnet outputs are divided by ``output_scale_factor``."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = self.resnet(channels, "resnets_0", self.output_scale_factor)(x, temb)
        x = self.transformer(channels, "attentions_0")(x, context)
        return self.resnet(channels, "resnets_1", self.output_scale_factor)(x, temb)


def _per_block(value: Any, n: int, key: str) -> tuple[Any, ...]:
    """A per-block setting given as one value or a list of ``n`` values, as a tuple of ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{key} has {len(value)} entries but the UNet has {n} blocks: {value!r}")
        return tuple(value)
    return (value,) * n


class UNet2DConditionModel(nn.Module):
    """Text-conditioned denoising UNet.

    ``__call__(sample [B, H, W, C_in], timesteps [B] or scalar, encoder_hidden_states [B, L, D])
    -> [B, H, W, C_out]`` in ``dtype``. Per-block settings (``layers_per_block``,
    ``attention_head_dim``, ``only_cross_attention``, ``transformer_layers_per_block``) take one
    value or one per down block; ``attention_head_dim`` is the number of heads, as in diffusers'
    configs. ``stop_sot_kv_grad`` stops gradients through the first context token's keys and
    values in every attention that reads the context (the forward pass is unchanged).
    ``remat`` recomputes activations in the backward pass instead of storing them: ``attention``
    per transformer block, ``blocks`` per down, mid and up block (the same values; what it saves
    depends on the backend's scheduler, docs/design.md "Memory of the train step").
    """

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    stop_sot_kv_grad: bool = False
    attention_implementation: str | None = None
    remat: str = "none"  # none | attention | blocks
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> UNet2DConditionModel:
        """Builds the model from diffusers' ``config.json`` dict; ``kwargs`` set other fields (dtype, ...).

        Raises ValueError naming the key and value of any setting this model does not implement.
        """
        fields: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _REQUIRED_VALUES:
                if value != _REQUIRED_VALUES[key]:
                    raise ValueError(
                        f"unsupported UNet config: {key}={value!r} (only {_REQUIRED_VALUES[key]!r} is implemented)"
                    )
                continue
            if key not in _FIELD_KEYS:
                raise ValueError(f"unsupported UNet config key: {key}={value!r}")
            fields[key] = tuple(value) if isinstance(value, list) else value

        n = len(fields.get("down_block_types", cls.down_block_types))
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = fields.get(key, getattr(cls, key))
            if len(types) != n:
                raise ValueError(f"unsupported UNet config: {key}={list(types)!r} (needs {n} entries)")
            for t in types:
                if t not in allowed:
                    raise ValueError(f"unsupported UNet config: {key} contains {t!r} (supported: {list(allowed)})")
        block_out_channels = fields.get("block_out_channels", cls.block_out_channels)
        if len(block_out_channels) != n:
            raise ValueError(
                f"unsupported UNet config: block_out_channels={list(block_out_channels)!r} (needs {n} entries)"
            )
        if fields.get("norm_num_groups", cls.norm_num_groups) is None:
            raise ValueError("unsupported UNet config: norm_num_groups=None (no output normalisation)")
        cross = fields.get("cross_attention_dim", cls.cross_attention_dim)
        if isinstance(cross, tuple):
            # One context feeds every block, so per-block widths can only be equal.
            if len(set(cross)) != 1:
                raise ValueError(f"unsupported UNet config: cross_attention_dim={list(cross)!r} (must be one width)")
            fields["cross_attention_dim"] = cross[0]
        layers = fields.get("transformer_layers_per_block", cls.transformer_layers_per_block)
        if isinstance(layers, tuple) and any(not isinstance(v, int) for v in layers):
            raise ValueError(f"unsupported UNet config: transformer_layers_per_block={list(layers)!r}")
        for key in ("layers_per_block", "attention_head_dim", "only_cross_attention", "transformer_layers_per_block"):
            _per_block(fields.get(key, getattr(cls, key)), n, key)
        for key in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
            if fields.get(key) is not None:
                activation(fields[key])
        fields.update(kwargs)
        return cls(**fields)

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        """Freshly initialised params (no ``{'params': ...}`` wrapper), from tiny dummy inputs."""
        size = 2 ** (len(self.block_out_channels) - 1)
        sample = jnp.zeros((1, size, size, self.in_channels), jnp.float32)
        context = jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32)
        # Compiled, because initialising op by op is several times slower.
        return jax.jit(self.init)(rng, sample, jnp.zeros((1,), jnp.int32), context)["params"]

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        n = len(self.block_out_channels)
        channels = self.block_out_channels
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
        only_cross = _per_block(self.only_cross_attention, n, "only_cross_attention")
        t_layers = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            act_fn=self.act_fn,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
            stop_sot_kv_grad=self.stop_sot_kv_grad,
            attention_implementation=self.attention_implementation,
            remat_attention=self.remat == "attention",
            **kw,
        )
        if self.remat not in ("none", "attention", "blocks"):
            raise ValueError(f"remat must be none, attention or blocks, got {self.remat!r}")
        by_block = self.remat == "blocks"
        down_cls = nn.remat(DownBlock2D) if by_block else DownBlock2D
        mid_cls = nn.remat(UNetMidBlock2DCrossAttn) if by_block else UNetMidBlock2DCrossAttn
        # upsample_size (argument 5, counting the module) is a shape: static under remat.
        up_cls = nn.remat(UpBlock2D, static_argnums=(5,)) if by_block else UpBlock2D

        batch = sample.shape[0]
        x = sample.astype(self.dtype)
        if self.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_emb = timestep_embedding(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift).astype(self.dtype)
        emb = TimestepEmbedding(
            self.time_embedding_dim or 4 * channels[0],
            act_fn=self.act_fn,
            post_act_fn=self.timestep_post_act,
            name="time_embedding",
            **kw,
        )(t_emb)
        if self.time_embedding_act_fn is not None:
            emb = activation(self.time_embedding_act_fn)(emb)

        x = conv(channels[0], self.conv_in_kernel, name="conv_in", **kw)(x)

        skips: list[jax.Array] = [x]
        for i, block_type in enumerate(self.down_block_types):
            x, block_skips = down_cls(
                out_channels=channels[i],
                num_layers=layers[i],
                has_attention=block_type == "CrossAttnDownBlock2D",
                add_downsample=i < n - 1,
                downsample_padding=self.downsample_padding,
                heads=heads[i],
                transformer_layers=t_layers[i],
                only_cross_attention=only_cross[i],
                name=f"down_blocks_{i}",
                **common,
            )(x, emb, context)
            skips.extend(block_skips)

        x = mid_cls(
            heads=heads[-1],
            transformer_layers=t_layers[-1],
            output_scale_factor=self.mid_block_scale_factor,
            name="mid_block",
            **common,
        )(x, emb, context)

        # When the input is not divisible by the total downsampling, each upsampler resizes to
        # its matching skip instead of doubling, as the skips' odd sizes must be met exactly.
        factor = 2 ** (n - 1)
        resize_to_skips = any(d % factor for d in sample.shape[1:3])
        for i, block_type in enumerate(self.up_block_types):
            r = n - 1 - i  # index of the matching down block
            num_layers = layers[r] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            is_last = i == n - 1
            upsample_size = tuple(skips[-1].shape[1:3]) if resize_to_skips and not is_last else None
            x = up_cls(
                out_channels=channels[r],
                num_layers=num_layers,
                has_attention=block_type == "CrossAttnUpBlock2D",
                add_upsample=not is_last,
                heads=heads[r],
                transformer_layers=t_layers[r],
                only_cross_attention=only_cross[r],
                name=f"up_blocks_{i}",
                **common,
            )(x, block_skips, emb, context, upsample_size)

        x = activation(self.act_fn)(group_norm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(x))
        return conv(self.out_channels, self.conv_out_kernel, name="conv_out", **kw)(x)
