"""CLIP text and vision transformers in Flax (linen), numerically matching transformers' PyTorch CLIP.

Parameter paths follow the PyTorch state-dict names with list indices joined by ``_``
(``text_model/encoder/layers_0/self_attn/q_proj/kernel``), so ``convert.torch_to_flax`` loads
checkpoints directly. Top-level layouts:

* ``CLIPTextModel``: ``text_model/...`` (a Stable Diffusion ``text_encoder/`` checkpoint).
* ``CLIPTextModelWithProjection``: ``text_model/...`` and ``text_projection``.
* ``CLIPVisionModel``: ``vision_model/...``.
* ``CLIPModel``: ``text_model``, ``vision_model``, ``text_projection``, ``visual_projection``, ``logit_scale``.

transformers >= 5 saves ``CLIPTextModel`` / ``CLIPVisionModel`` without the ``text_model.`` /
``vision_model.`` level; ``with_prefix`` restores it before conversion.

Images are channels-last ``[B, H, W, C]`` and already normalised with CLIP's mean and std.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Params = dict[str, Any]
Dtype = Any


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# transformers' activation names that this module reproduces. "gelu_new", "gelu_fast" and
# "gelu_pytorch_tanh" are all the tanh approximation, written differently.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": _quick_gelu,
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Checkpoints written before transformers fixed CLIP's eos id carry eos_token_id == 2; for them
# the pooled token is the one with the largest id (the EOS token is the last in the vocabulary).
_LEGACY_EOS_TOKEN_ID = 2


# --------------------------------------------------------------------------- configuration


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"CLIP config: {name} must be an integer, got {value!r}")
    return int(value)


def _positive_int(value: Any, name: str) -> int:
    value = _int(value, name)
    if value <= 0:
        raise ValueError(f"CLIP config: {name} must be positive, got {value}")
    return value


def _activation_name(value: Any) -> str:
    if value not in _ACTIVATIONS:
        raise ValueError(f"CLIP config: unsupported hidden_act {value!r} (supported: {sorted(_ACTIVATIONS)})")
    return str(value)


def _float(value: Any, default: float) -> float:
    return default if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text transformer (the keys of transformers' CLIPTextConfig that matter)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """Reads a CLIPTextConfig json dict; missing keys take transformers' defaults, unknown keys are ignored.

        A full CLIPConfig dict is accepted too (its ``text_config`` is used). Raises ValueError
        naming any value this implementation cannot reproduce.
        """
        config = dict(config)
        if config.get("model_type") == "clip" or ("text_config" in config and "hidden_size" not in config):
            return _clip_config_parts(config)[0]
        d = cls()
        get = _reader(config, d)
        if "eos_token_id" in config and config["eos_token_id"] is None:
            raise ValueError("CLIP config: eos_token_id is None; the pooled output needs an end-of-text id")
        out = cls(
            vocab_size=_positive_int(get("vocab_size"), "vocab_size"),
            hidden_size=_positive_int(get("hidden_size"), "hidden_size"),
            intermediate_size=_positive_int(get("intermediate_size"), "intermediate_size"),
            num_hidden_layers=_int(get("num_hidden_layers"), "num_hidden_layers"),
            num_attention_heads=_positive_int(get("num_attention_heads"), "num_attention_heads"),
            max_position_embeddings=_positive_int(get("max_position_embeddings"), "max_position_embeddings"),
            hidden_act=_activation_name(get("hidden_act")),
            layer_norm_eps=_float(config.get("layer_norm_eps"), d.layer_norm_eps),
            # A list of eos ids has no single pooled position in transformers either.
            eos_token_id=_int(get("eos_token_id"), "eos_token_id"),
            projection_dim=_positive_int(get("projection_dim"), "projection_dim"),
        )
        _check_heads(out.hidden_size, out.num_attention_heads)
        return out


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a CLIP vision transformer (the keys of transformers' CLIPVisionConfig that matter)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CLIPVisionConfig:
        """Reads a CLIPVisionConfig json dict (or a CLIPConfig's ``vision_config``); see CLIPTextConfig.from_dict."""
        config = dict(config)
        if config.get("model_type") == "clip" or ("vision_config" in config and "hidden_size" not in config):
            return _clip_config_parts(config)[1]
        d = cls()
        get = _reader(config, d)
        out = cls(
            hidden_size=_positive_int(get("hidden_size"), "hidden_size"),
            intermediate_size=_positive_int(get("intermediate_size"), "intermediate_size"),
            num_hidden_layers=_int(get("num_hidden_layers"), "num_hidden_layers"),
            num_attention_heads=_positive_int(get("num_attention_heads"), "num_attention_heads"),
            num_channels=_positive_int(get("num_channels"), "num_channels"),
            # transformers' CLIP embeddings only work with square images and patches given as one int.
            image_size=_positive_int(get("image_size"), "image_size"),
            patch_size=_positive_int(get("patch_size"), "patch_size"),
            hidden_act=_activation_name(get("hidden_act")),
            layer_norm_eps=_float(config.get("layer_norm_eps"), d.layer_norm_eps),
            projection_dim=_positive_int(get("projection_dim"), "projection_dim"),
        )
        _check_heads(out.hidden_size, out.num_attention_heads)
        if out.patch_size > out.image_size:
            raise ValueError(f"CLIP config: patch_size {out.patch_size} exceeds image_size {out.image_size}")
        return out

    @property
    def num_positions(self) -> int:
        """Class token plus one position per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1


def _reader(config: Mapping[str, Any], defaults: Any) -> Callable[[str], Any]:
    """key -> config[key], or the default where the key is missing or null (as transformers fills it)."""

    def get(key: str) -> Any:
        value = config.get(key)
        return getattr(defaults, key) if value is None else value

    return get


def _check_heads(hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"CLIP config: hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}")


def _clip_config_parts(config: Mapping[str, Any]) -> tuple[CLIPTextConfig, CLIPVisionConfig, int, float]:
    """CLIPConfig dict -> (text config, vision config, projection_dim, logit_scale_init_value)."""
    parts = []
    for name in ("text_config", "vision_config"):
        sub = dict(config.get(name) or {})
        # Older CLIPConfig files also carry "<name>_dict", which overrides "<name>" when loaded.
        sub.update(config.get(f"{name}_dict") or {})
        parts.append(sub)
    text = CLIPTextConfig.from_dict(parts[0])
    vision = CLIPVisionConfig.from_dict(parts[1])
    projection_dim = config.get("projection_dim")
    projection_dim = _positive_int(512 if projection_dim is None else projection_dim, "projection_dim")
    logit_scale = _float(config.get("logit_scale_init_value"), 2.6592)
    return text, vision, projection_dim, logit_scale


# --------------------------------------------------------------------------- outputs


class _ByKey:
    """Outputs can also be read by field name (``out["pooler_output"]``), as transformers' outputs can."""

    def __getitem__(self, key: str) -> jax.Array:
        return getattr(self, key)


@struct.dataclass
class CLIPPooledOutput(_ByKey):
    """``last_hidden_state [B, T, D]`` and ``pooler_output [B, D]`` (EOS token / class token)."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array


@struct.dataclass
class CLIPTextProjectionOutput(_ByKey):
    """``text_embeds [B, P]`` (projected pooled output, not normalised) and ``last_hidden_state [B, L, D]``."""

    text_embeds: jax.Array
    last_hidden_state: jax.Array


@struct.dataclass
class CLIPOutput(_ByKey):
    """Image-text logits (scaled cosine similarities) and the L2-normalised embeddings they come from."""

    logits_per_image: jax.Array
    logits_per_text: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array


# --------------------------------------------------------------------------- layers


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch computes it; the one-pass form loses digits when the mean is large.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections; ``mask`` is boolean, broadcastable to [B, N, T, T]."""

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        head_dim = self.hidden_size // self.num_heads

        def proj(name: str) -> nn.Dense:
            return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        b, t, _ = x.shape
        q = proj("q_proj")(x).reshape(b, t, self.num_heads, head_dim)
        k = proj("k_proj")(x).reshape(b, t, self.num_heads, head_dim)
        v = proj("v_proj")(x).reshape(b, t, self.num_heads, head_dim)
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            scale=head_dim**-0.5,
            is_causal=is_causal,
            implementation=self.attention_implementation,
        )
        return proj("out_proj")(out.reshape(b, t, self.hidden_size))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = _ACTIVATIONS[self.hidden_act](x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        c = self.config
        h = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm1")(x)
        h = CLIPAttention(
            c.hidden_size,
            c.num_attention_heads,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_implementation=self.attention_implementation,
            name="self_attn",
        )(h, mask, is_causal)
        x = x + h
        h = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm2")(x)
        h = CLIPMLP(
            c.hidden_size, c.intermediate_size, c.hidden_act, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp"
        )(h)
        return x + h


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` encoder layers named ``layers_<i>``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(
                self.config,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention_implementation=self.attention_implementation,
                name=f"layers_{i}",
            )(x, mask, is_causal)
        return x


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(0.02)
        token = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=init,
            name="token_embedding",
        )
        position = nn.Embed(
            c.max_position_embeddings,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=init,
            name="position_embedding",
        )
        return token(input_ids) + position(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal encoder, final LayerNorm, pooled at the end-of-text token."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPPooledOutput:
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings {c.max_position_embeddings}"
            )
        x = CLIPTextEmbeddings(c, dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings")(input_ids)
        # Padding hides keys only; the causal mask is added by dot_product_attention. Query rows left
        # with no visible key (left padding) attend uniformly, as transformers' eager path does.
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        x = CLIPEncoder(
            c,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_implementation=self.attention_implementation,
            name="encoder",
        )(x, mask, is_causal=True)
        x = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "final_layer_norm")(x)
        if c.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            # First occurrence: the pad token may equal the EOS token. Index 0 if there is none.
            eos_index = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(x, eos_index[:, None, None], axis=1)[:, 0]
        return CLIPPooledOutput(last_hidden_state=x, pooler_output=pooled)


class CLIPVisionEmbeddings(nn.Module):
    """Class token plus non-overlapping patch embedding (a conv without bias), plus position embedding."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        b, h, w, ch = pixel_values.shape
        if (h, w) != (c.image_size, c.image_size) or ch != c.num_channels:
            raise ValueError(
                f"pixel_values must be [B, {c.image_size}, {c.image_size}, {c.num_channels}], got {pixel_values.shape}"
            )
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(c.hidden_size**-0.5), (c.hidden_size,), self.param_dtype
        )
        patches = nn.Conv(
            c.hidden_size,
            kernel_size=(c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(0.02),
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        # Row-major over the patch grid, the order PyTorch's flatten(2) gives.
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        position = nn.Embed(
            c.num_positions,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="position_embedding",
        )
        return x + position(jnp.arange(c.num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    """Embeddings, pre-LayerNorm, encoder; pooled output is the post-LayerNorm class token."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPPooledOutput:
        c = self.config
        x = CLIPVisionEmbeddings(c, dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings")(pixel_values)
        # The misspelling is the checkpoint's parameter name.
        x = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "pre_layrnorm")(x)
        x = CLIPEncoder(
            c,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_implementation=self.attention_implementation,
            name="encoder",
        )(x)
        pooled = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "post_layernorm")(x[:, 0])
        return CLIPPooledOutput(last_hidden_state=x, pooler_output=pooled)


# --------------------------------------------------------------------------- top-level models


def _dummy_ids(config: CLIPTextConfig) -> jax.Array:
    return jnp.zeros((1, min(2, config.max_position_embeddings)), jnp.int32)


def _dummy_pixels(config: CLIPVisionConfig) -> jax.Array:
    return jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)


class CLIPTextModel(nn.Module):
    """CLIP text encoder (Stable Diffusion's ``text_encoder``); params live under ``text_model``.

    ``apply({'params': p}, input_ids [B, L] int, attention_mask [B, L] | None)`` -> CLIPPooledOutput
    with ``last_hidden_state [B, L, D]`` (after the final LayerNorm) and ``pooler_output [B, D]``.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> CLIPTextModel:
        """Builds the model from a transformers CLIPTextConfig json dict; kwargs set module fields (dtype, ...)."""
        return cls(CLIPTextConfig.from_dict(config), **kwargs)

    def setup(self) -> None:
        self.text_model = CLIPTextTransformer(
            self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_implementation=self.attention_implementation,
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPPooledOutput:
        return self.text_model(input_ids, attention_mask)

    def init_weights(self, rng: jax.Array) -> Params:
        """Freshly initialised params (no ``{'params': ...}`` wrapper); use under jax.eval_shape for shapes."""
        return self.init(rng, _dummy_ids(self.config))["params"]


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP text encoder plus ``text_projection`` (no bias) of the pooled output, as used by SDXL's second encoder.

    ``apply({'params': p}, input_ids, attention_mask=None)`` -> CLIPTextProjectionOutput. The config's
    ``projection_dim`` sizes the projection.
    """

    def setup(self) -> None:
        super().setup()
        self.text_projection = nn.Dense(
            self.config.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )

    def __call__(  # type: ignore[override]
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPTextProjectionOutput:
        out = self.text_model(input_ids, attention_mask)
        return CLIPTextProjectionOutput(
            text_embeds=self.text_projection(out.pooler_output), last_hidden_state=out.last_hidden_state
        )


class CLIPVisionModel(nn.Module):
    """CLIP image encoder; params live under ``vision_model``.

    ``apply({'params': p}, pixel_values [B, H, W, C])`` -> CLIPPooledOutput with ``last_hidden_state
    [B, 1 + patches, D]`` (no final LayerNorm, as in transformers) and ``pooler_output [B, D]``.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> CLIPVisionModel:
        """Builds the model from a transformers CLIPVisionConfig json dict."""
        return cls(CLIPVisionConfig.from_dict(config), **kwargs)

    def setup(self) -> None:
        self.vision_model = CLIPVisionTransformer(
            self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_implementation=self.attention_implementation,
        )

    def __call__(self, pixel_values: jax.Array) -> CLIPPooledOutput:
        return self.vision_model(pixel_values)

    def init_weights(self, rng: jax.Array) -> Params:
        """Freshly initialised params (no ``{'params': ...}`` wrapper)."""
        return self.init(rng, _dummy_pixels(self.config))["params"]


class CLIPModel(nn.Module):
    """Text and image towers with their projections and the learned logit scale.

    ``get_text_features(input_ids, attention_mask=None) -> [B, P]`` and
    ``get_image_features(pixel_values [B, H, W, C]) -> [B, P]`` return projected, unnormalised
    embeddings; call them with ``model.apply({'params': p}, ..., method=model.get_image_features)``.
    ``__call__(input_ids, pixel_values, attention_mask=None)`` returns a CLIPOutput.
    """

    text_config: CLIPTextConfig
    vision_config: CLIPVisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> CLIPModel:
        """Builds the model from a transformers CLIPConfig json dict (``text_config``, ``vision_config``, ...)."""
        text, vision, projection_dim, logit_scale = _clip_config_parts(config)
        return cls(text, vision, projection_dim=projection_dim, logit_scale_init_value=logit_scale, **kwargs)

    def setup(self) -> None:
        common = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, attention_implementation=self.attention_implementation
        )
        self.text_model = CLIPTextTransformer(self.text_config, **common)
        self.vision_model = CLIPVisionTransformer(self.vision_config, **common)
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_projection = nn.Dense(self.projection_dim, **dense)
        self.visual_projection = nn.Dense(self.projection_dim, **dense)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(self.logit_scale_init_value), (), self.param_dtype
        )

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Projected pooled text embedding ``[B, P]`` (not normalised)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected pooled image embedding ``[B, P]`` (not normalised); pixels channels-last, CLIP-normalised."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(
        self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPOutput:
        text = self.get_text_features(input_ids, attention_mask)
        image = self.get_image_features(pixel_values)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        logits_per_text = (text @ image.T) * jnp.exp(self.logit_scale).astype(text.dtype)
        return CLIPOutput(
            logits_per_image=logits_per_text.T, logits_per_text=logits_per_text, text_embeds=text, image_embeds=image
        )

    def init_weights(self, rng: jax.Array) -> Params:
        """Freshly initialised params (no ``{'params': ...}`` wrapper), touching both towers."""
        return self.init(rng, _dummy_ids(self.text_config), _dummy_pixels(self.vision_config))["params"]
