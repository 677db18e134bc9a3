"""Attention layers (channels-last): multi-head attention, the transformer block and the
spatial transformer used inside the UNet's cross-attention blocks.

All attention goes through ``blocked_attention.dot_product_attention``, which has the contract of
``jax.nn.dot_product_attention`` ([B, T, N, H] layout); its ``implementation`` argument is exposed as
``attention_implementation``: None picks (query-blocked attention on CPU for large score
matrices, else JAX's choice), "blocked" forces the CPU path, "xla" forces JAX's plain XLA
attention, "cudnn" asks for the cuDNN flash kernel on GPU.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ablate_jax.models.blocked_attention import dot_product_attention
from ablate_jax.models.blocks import conv, group_norm

Dtype = Any


class Attention(nn.Module):
    """Multi-head attention with ``to_q``/``to_k``/``to_v``/``to_out_0`` projections.

    ``__call__(x, context=None)``: ``x`` is ``[B, T, C]`` or ``[B, H, W, C]`` (flattened to
    ``H * W`` tokens and restored); keys and values come from ``context`` ``[B, S, D]`` when
    given, else from ``x``. Optional pre-GroupNorm (``group_norm``) and residual connection
    cover the VAE's single-head spatial attention.
    """

    heads: int
    head_dim: int
    out_dim: int | None = None  # defaults to the query's channel count
    qkv_bias: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    upcast: bool = False
    # Cross-attention only: the first context token (start-of-text) contributes keys and values
    # in the forward pass but passes no gradient back through them.
    stop_sot_kv_grad: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x
        if self.norm_num_groups is not None:
            x = group_norm(self.norm_num_groups, self.norm_eps, name="group_norm", **kw)(x)
        spatial_shape = x.shape[1:-1] if x.ndim == 4 else None
        b, c = x.shape[0], x.shape[-1]
        x = x.reshape(b, -1, c)  # [B, T, C]
        inner = self.heads * self.head_dim
        q = nn.Dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x)
        kv_source = x if context is None else context
        k = nn.Dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(kv_source)
        v = nn.Dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(kv_source)
        if self.stop_sot_kv_grad and context is not None:
            k = jnp.concatenate([jax.lax.stop_gradient(k[:, :1]), k[:, 1:]], axis=1)
            v = jnp.concatenate([jax.lax.stop_gradient(v[:, :1]), v[:, 1:]], axis=1)
        q = q.reshape(b, q.shape[1], self.heads, self.head_dim)  # [B, T, N, H]
        k = k.reshape(b, k.shape[1], self.heads, self.head_dim)  # [B, S, N, H]
        v = v.reshape(b, v.shape[1], self.heads, self.head_dim)
        # cuDNN's kernel takes only half-precision inputs and already accumulates the logits and
        # the softmax in float32, so upcasting is left to the other implementations.
        if self.upcast and self.attention_implementation != "cudnn":
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        out = dot_product_attention(
            q, k, v, scale=self.head_dim**-0.5, implementation=self.attention_implementation
        )
        out = out.reshape(b, out.shape[1], inner).astype(self.dtype)
        out = nn.Dense(self.out_dim or c, name="to_out_0", **kw)(out)
        if spatial_shape is not None:
            out = out.reshape(b, *spatial_shape, out.shape[-1])
        if self.residual_connection:
            out = out + residual.astype(out.dtype)
        return out


class GEGLU(nn.Module):
    """``proj`` to twice the width, then value * gelu(gate) with the exact (erf) GELU."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU (``net_0``) to ``mult * C`` channels, then a linear layer (``net_2``) back to ``C``."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        return nn.Dense(dim, name="net_2", dtype=self.dtype, param_dtype=self.param_dtype)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention (``attn1``), cross-attention (``attn2``) and feed-forward (``ff``).

    ``__call__(x [B, T, C], context [B, S, D]) -> [B, T, C]``. With ``only_cross_attention``
    ``attn1`` attends to the context too.
    """

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    stop_sot_kv_grad: bool = False
    attention_implementation: str | None = None
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(
            heads=self.heads,
            head_dim=self.head_dim,
            upcast=self.upcast_attention,
            stop_sot_kv_grad=self.stop_sot_kv_grad,
            attention_implementation=self.attention_implementation,
            **kw,
        )

        def layer_norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=self.norm_eps, use_fast_variance=False, name=name, **kw)

        h = layer_norm("norm1")(x)
        x = Attention(name="attn1", **attn)(h, context if self.only_cross_attention else None) + x
        h = layer_norm("norm2")(x)
        x = Attention(name="attn2", **attn)(h, context) + x
        h = layer_norm("norm3")(x)
        return FeedForward(name="ff", **kw)(h) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, ``proj_in``, transformer blocks, ``proj_out``, residual.

    ``__call__(x [B, H, W, C], context [B, S, D]) -> [B, H, W, C]``. The projections are
    linear layers with ``use_linear_projection`` (SD 2.x) and 1x1 convolutions otherwise (SD 1.x).
    """

    heads: int
    head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    stop_sot_kv_grad: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        residual = x
        h = group_norm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, name="proj_in", **kw)(h.reshape(b, height * width, channels))
        else:
            h = conv(inner, 1, name="proj_in", **kw)(h).reshape(b, height * width, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                heads=self.heads,
                head_dim=self.head_dim,
                only_cross_attention=self.only_cross_attention,
                upcast_attention=self.upcast_attention,
                stop_sot_kv_grad=self.stop_sot_kv_grad,
                attention_implementation=self.attention_implementation,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, context)
        if self.use_linear_projection:
            h = nn.Dense(channels, name="proj_out", **kw)(h).reshape(b, height, width, channels)
        else:
            h = conv(channels, 1, name="proj_out", **kw)(h.reshape(b, height, width, inner))
        return h + residual.astype(h.dtype)
