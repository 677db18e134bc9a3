"""Stable Diffusion 1.x at full size, without its weights: the shapes for FLOP counts and GPU runs.

``pipeline(abstract=True)`` gives a :class:`ablate_jax.models.loading.Pipeline` whose parameters
are ``jax.ShapeDtypeStruct`` (nothing allocated; enough to lower a program and count its FLOPs);
``abstract=False`` fills them with random values, for timing on an accelerator. The configs are
those of Stable Diffusion v1.4 / v1.5 (860M-parameter UNet, 77-token CLIP ViT-L/14 text tower).
"""

from __future__ import annotations

import types
from typing import Any

import jax
import jax.numpy as jnp

from ablate_jax.models.clip import CLIPTextModel
from ablate_jax.models.loading import Pipeline
from ablate_jax.models.unet import UNet2DConditionModel
from ablate_jax.models.vae import AutoencoderKL

UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
    "timestep_spacing": "leading", "clip_sample": False,
}


class _Tokenizer:
    """Stands in for CLIP's tokenizer: fixed-length ids, enough to shape the programs."""

    model_max_length = 77
    pad_token_id = bos_token_id = 49406
    eos_token_id = 49407

    def __call__(self, texts, **_: Any):
        import numpy as np  # noqa: PLC0415

        ids = np.full((len(texts), self.model_max_length), self.eos_token_id, np.int32)
        ids[:, 0] = self.bos_token_id
        return types.SimpleNamespace(input_ids=ids)


# The same layout (blocks, layers, heads, 77 tokens) at a sliver of the width: for checking the
# scripts on a CPU, not for timing.
TINY = {
    "unet": {"block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 64},
    "vae": {"block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8},
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def configs(size: str = "full") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(unet, vae, text)`` configs: ``full`` (SD 1.x) or ``tiny`` (same layout, narrow)."""
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    if size == "full":
        return dict(UNET), dict(VAE), dict(TEXT)
    return {**UNET, **TINY["unet"]}, {**VAE, **TINY["vae"]}, {**TEXT, **TINY["text"]}


def pipeline(*, size: str = "full", dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, abstract: bool = True,
             attention_implementation: str | None = None, seed: int = 0) -> Pipeline:
    """SD 1.x-shaped modules with abstract (or random) parameters; ``dtype`` is the compute dtype."""
    unet_cfg, vae_cfg, text_cfg = configs(size)
    attn = {"attention_implementation": attention_implementation} if attention_implementation else {}
    unet = UNet2DConditionModel.from_config(unet_cfg, dtype=dtype, param_dtype=param_dtype, **attn)
    vae = AutoencoderKL.from_config(vae_cfg, dtype=dtype, param_dtype=param_dtype)
    text = CLIPTextModel.from_config(text_cfg, dtype=dtype, param_dtype=param_dtype, **attn)
    keys = jax.random.split(jax.random.key(seed), 3)

    def init(module, key):
        if abstract:
            return jax.eval_shape(module.init_weights, key)
        return jax.jit(module.init_weights)(key)

    params = {"unet": init(unet, keys[0]), "vae": init(vae, keys[1]), "text_encoder": init(text, keys[2])}
    return Pipeline(unet=unet, vae=vae, text_encoder=text, params=params, tokenizer=_Tokenizer(),
                    scheduler_config=dict(SCHEDULER), vae_scaling_factor=VAE["scaling_factor"],
                    sample_size=UNET["sample_size"], path="sd1.x-shapes", model_index={})


def count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
