"""The project's Flax Stable Diffusion and CLIP models, and diffusers-format loading."""

from ablate_jax.models.convert import ConversionError, flax_to_torch, torch_to_flax
from ablate_jax.models.loading import (
    CLIP,
    ModelLoadError,
    Pipeline,
    load_clip,
    load_pipeline,
    save_torch_safetensors,
)

__all__ = [
    "CLIP",
    "ConversionError",
    "ModelLoadError",
    "Pipeline",
    "flax_to_torch",
    "load_clip",
    "load_pipeline",
    "save_torch_safetensors",
    "torch_to_flax",
]
