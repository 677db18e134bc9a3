"""Text to image: tokenize, encode, denoise and decode in one compiled program per shape.

``draw`` is the one text-to-image path of the project (anchor generation, evaluation and the
toy world all use it). Image ``i`` of a call depends only on ``key`` and its global index
``start_index + i``: its initial latents and any sampler noise come from
``fold_in(key, start_index + i)``, so the images do not depend on the batch size, the number
of devices or how a job is split between processes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ablate_jax import samplers, sharding
from ablate_jax.models.loading import Pipeline
from ablate_jax.schedule import Schedule

SAMPLERS = ("ddim", "dpmpp_2m")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn. ``guidance_scale`` 1 disables classifier-free guidance."""

    sampler: str = "dpmpp_2m"
    num_steps: int = 25
    guidance_scale: float = 6.0
    eta: float = 0.0
    height: int | None = None  # pixels; None: the UNet's sample_size times the VAE factor
    width: int | None = None

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.num_steps <= 0:
            raise ValueError(f"num_steps must be positive, got {self.num_steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"eta applies to the ddim sampler only, got eta={self.eta} with {self.sampler}")


def tokenize(pipeline: Pipeline, prompts: Sequence[str]) -> np.ndarray:
    """Token ids ``[N, L]`` padded to the model's maximum length, as Stable Diffusion pads them."""
    tok = pipeline.tokenizer
    return np.asarray(
        tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np").input_ids,
        dtype=np.int32,
    )


def vocabulary_words(tokenizer: Any, avoid: Sequence[str] = ()) -> list[str]:
    """Whole words that are one token each (so a prompt naming them uses exactly that token), sorted by id,
    less the words of ``avoid``."""
    avoided = {w.lower() for text in avoid for w in text.split()}
    words = []
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if not token.endswith("</w>"):
            continue
        word = token[: -len("</w>")]
        if len(word) < 3 or not word.isalpha() or word.lower() in avoided:
            continue
        if tuple(tokenizer(word, add_special_tokens=False).input_ids) == (i,):
            words.append(word)
    return words


def latent_shape(pipeline: Pipeline, cfg: SamplingConfig) -> tuple[int, int, int]:
    """``(h, w, c)`` of one image's latents."""
    f = pipeline.vae_downsample
    size = pipeline.sample_size * f
    height, width = cfg.height or size, cfg.width or size
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    return height // f, width // f, pipeline.unet.in_channels


def initial_latents(key: jax.Array, indices: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Standard normal latents ``[B, h, w, c]``, image ``i`` from ``fold_in(key, i)``."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(indices)


def _sample_fn(pipeline: Pipeline, cfg: SamplingConfig, schedule: Schedule):
    """The whole text-to-image computation for one batch, ready to jit."""
    unet, vae, text = pipeline.unet, pipeline.vae, pipeline.text_encoder
    guided = cfg.guidance_scale != 1.0

    def run(params, ids, uncond_ids, keys, latents):
        # ids [B, L]; keys [B] (one per image); latents [B, h, w, c]
        states = text.apply({"params": params["text_encoder"]}, ids).last_hidden_state

        def apply_unet(x, t, context):
            return unet.apply({"params": params["unet"]}, x, t, context)

        if guided:
            uncond = text.apply({"params": params["text_encoder"]}, uncond_ids).last_hidden_state
            model_fn = samplers.guided_model_fn(apply_unet, states, uncond, cfg.guidance_scale)
        else:

            def model_fn(x, t):
                return apply_unet(x, t, states).astype(jnp.float32)

        z = samplers.sample(
            model_fn, schedule, latents, keys, sampler=cfg.sampler, num_steps=cfg.num_steps, eta=cfg.eta
        )
        image = vae.apply({"params": params["vae"]}, z / pipeline.vae_scaling_factor, method=vae.decode)
        return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)  # [B, H, W, 3] in [0, 1]

    return run


@functools.lru_cache(maxsize=16)
def _compiled(pipeline: Pipeline, cfg: SamplingConfig, mesh: jax.sharding.Mesh):
    schedule = Schedule.from_config(pipeline.scheduler_config)
    batch = sharding.batch_sharded(mesh)
    rep = sharding.replicated(mesh)
    return jax.jit(
        _sample_fn(pipeline, cfg, schedule),
        in_shardings=(rep, batch, rep, batch, batch),
        out_shardings=batch,
    )


def draw(
    pipeline: Pipeline,
    params: dict[str, Any],
    prompts: Sequence[str],
    key: jax.Array,
    cfg: SamplingConfig = SamplingConfig(),
    *,
    latents: np.ndarray | None = None,
    start_index: int = 0,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    output_type: str = "uint8",
    progress: bool = False,
) -> np.ndarray:
    """Images for ``prompts``: uint8 ``[N, H, W, 3]`` (or float32 in [0, 1] with ``output_type='float'``).

    ``latents`` (``[N, h, w, c]``) replaces the initial noise. ``batch_size`` is the global batch
    of one compiled call (default: one image per device); it is rounded up to a multiple of the
    device count and a short last batch is padded, never dropped.
    """
    cfg.validate()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate images for")
    if output_type not in ("uint8", "float"):
        raise ValueError(f"output_type must be 'uint8' or 'float', got {output_type!r}")
    mesh = mesh or sharding.make_mesh()
    n_dev = mesh.devices.size
    batch_size = sharding.round_up(batch_size or n_dev, n_dev)
    shape = latent_shape(pipeline, cfg)
    if latents is not None and tuple(latents.shape) != (len(prompts), *shape):
        raise ValueError(f"latents must have shape {(len(prompts), *shape)}, got {tuple(latents.shape)}")

    run = _compiled(pipeline, cfg, mesh)
    rep, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    # With several processes jit takes only global arrays: each process runs this call with the
    # same prompts and contributes its devices' slices (once, not per batch, for the parameters).
    multiprocess = jax.process_count() > 1
    ids = tokenize(pipeline, prompts)
    uncond_ids = tokenize(pipeline, [""])
    if multiprocess:
        params, uncond_ids = sharding.put(params, rep), sharding.put(uncond_ids, rep)
    indices = np.arange(start_index, start_index + len(prompts))
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    if latents is None:
        latents = initial_latents(key, indices, shape)
    # Sampler noise must not reuse the stream of the initial latents.
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)

    out = []
    bar = tqdm(total=len(prompts), desc="sampling", unit="img", disable=not progress)
    for lo in range(0, len(prompts), batch_size):
        hi = min(lo + batch_size, len(prompts))
        chunk = tuple(
            sharding.pad_batch(np.asarray(a[lo:hi]), batch_size)
            for a in (ids, jax.random.key_data(step_keys), latents)
        )
        if multiprocess:
            chunk = sharding.put(chunk, (batch, batch, batch))
        chunk_ids, chunk_keys, chunk_latents = chunk
        images = run(params, chunk_ids, uncond_ids, jax.random.wrap_key_data(chunk_keys), chunk_latents)
        out.append(sharding.to_host(images)[: hi - lo])
        bar.update(hi - lo)
    bar.close()
    images = np.concatenate(out)
    if output_type == "uint8":
        images = np.round(images * 255).astype(np.uint8)
    return images
