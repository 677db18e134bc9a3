"""Pretrains the toy world's miniature Stable Diffusion and its CLIP evaluator.

    python -m ablate_jax.toy.pretrain --out DIR [--budget full|smoke] [--seed 0]

Stages, each with the project's own Flax models and optax, deterministic for a seed:
  1. a tiny CLIP (text and vision towers), contrastive on image/caption pairs; single-attribute
     prompts ("A photo depicts a red shape") are positives of every image and every caption they
     describe, so the evaluator classifies attributes zero-shot and the text tower keeps every
     value apart;
  2. a tiny AutoencoderKL (L1 + L2 reconstruction and a small KL term, 4 latent channels);
  3. a tiny UNet2DConditionModel, epsilon loss (min-SNR weighted) on scaled latents, conditioned
     on the frozen CLIP text tower, with caption dropout so that classifier-free guidance works;
  4. the evaluator: the CLIP of stage 1 trained further with its text tower fixed, because a
     tiny ViT learns shapes slowly and the text tower is already the pipeline's text encoder.
     Half of its images are drawings after the VAE (encoded and decoded), since every image it
     judges comes out of that decoder; all are blurred and noised a little, as generated
     images are.

DIR receives ``pipeline/`` (a diffusers Stable Diffusion folder) and ``clip/`` (the evaluator,
a transformers CLIPModel folder with the same tokenizer); ``clip-joint/``, ``vae/`` and
``tokenizer/`` hold finished stages, so an interrupted run resumes where it stopped.
``--budget smoke`` runs a few steps of each stage. On a CPU, stage 1 trains in a second process
beside stage 2, and stage 4 at the lowest priority beside stage 3: their small ops leave cores
idle (``--one-process`` turns that off; the weights are the same either way).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import traverse_util
from tqdm.auto import tqdm

from ablate_jax import distributed, sharding
from ablate_jax import schedule as schedule_lib
from ablate_jax import toy as toy_package
from ablate_jax.models.clip import CLIPModel, CLIPTextModel
from ablate_jax.models.loading import load_tokenizer, save_component
from ablate_jax.models.unet import UNet2DConditionModel
from ablate_jax.models.vae import AutoencoderKL
from ablate_jax.toy import tokenizer as toy_tokenizer
from ablate_jax.toy import world

IMAGE_SIZE = 32
STAGES = ("clip", "vae", "unet", "evaluator")
CLIP_MEAN = (0.5, 0.5, 0.5)
CLIP_STD = (0.5, 0.5, 0.5)
DIFFUSERS_VERSION = "0.42.1"


def clip_config(vocab_size: int, max_length: int) -> dict[str, Any]:
    """A transformers CLIPConfig dict for the evaluator (its text tower is also the text encoder)."""
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=max_length, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        projection_dim=64, model_type="clip_text_model",
    )
    vision = dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=4, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
        model_type="clip_vision_model",
    )
    return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=64, logit_scale_init_value=2.6592,
                text_config=text, vision_config=vision)


def text_encoder_config(clip_cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(clip_cfg["text_config"], architectures=["CLIPTextModel"])


VAE_CONFIG: dict[str, Any] = dict(
    _class_name="AutoencoderKL", _diffusers_version=DIFFUSERS_VERSION, in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64], layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=8,
    sample_size=IMAGE_SIZE, scaling_factor=1.0,
)
LATENT_SIZE = IMAGE_SIZE // 4  # [8, 8, 4] latents: the UNet's cost on this CPU grows 5x at 16x16


def unet_config(cross_attention_dim: int) -> dict[str, Any]:
    return dict(
        _class_name="UNet2DConditionModel", _diffusers_version=DIFFUSERS_VERSION, sample_size=LATENT_SIZE,
        in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 64],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=4, cross_attention_dim=cross_attention_dim, norm_num_groups=8, flip_sin_to_cos=True,
        freq_shift=0, act_fn="silu", norm_eps=1e-5, center_input_sample=False, use_linear_projection=False,
    )


MIN_SNR_GAMMA = 5.0
# Share of UNet training examples whose caption is replaced by the empty one, so that the same
# network also predicts unconditionally, as classifier-free guidance needs. Guidance 6 extrapolates
# far along conditional minus unconditional; with 0.1 (Stable Diffusion's share) the base model drew
# the named background in 0.833 of held-out prompts at guidance 6, with 0.2 in 0.867 (10,000 steps
# at batch 64; docs/toy-world.md).
CAPTION_DROPOUT = 0.2

SCHEDULER_CONFIG: dict[str, Any] = dict(
    _class_name="DDIMScheduler", _diffusers_version=DIFFUSERS_VERSION, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
    steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Steps and batch sizes of each stage (``full``: 40 to 42 minutes on a 2-core CPU, ``--cpu-devices=2``).

    The UNet and the evaluator gain more from steps than from batch size: on this CPU a step's cost
    is mostly fixed (a UNet step alone takes 0.19 s at batch 64, 0.11 s at 32). The UNet at batch 32
    for 12,000 steps meets every quality bar, as batch 64 for 10,000 steps did, where batch 128 for
    5,000 steps fell far short (docs/toy-world.md).
    """

    examples: int
    clip_steps: int
    clip_batch: int
    vae_steps: int
    vae_batch: int
    unet_steps: int
    unet_batch: int
    evaluator_steps: int
    evaluator_batch: int


BUDGETS = {
    "full": Budget(examples=40_000, clip_steps=1000, clip_batch=128, vae_steps=1200, vae_batch=32,
                   unet_steps=12000, unet_batch=32, evaluator_steps=4000, evaluator_batch=64),
    "smoke": Budget(examples=256, clip_steps=6, clip_batch=32, vae_steps=6, vae_batch=16, unet_steps=6, unet_batch=16,
                    evaluator_steps=6, evaluator_batch=32),
}


# ------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class WorldData:
    images: np.ndarray  # [N, 32, 32, 3] uint8
    ids: np.ndarray  # [N, L] int32 caption tokens
    attrs: np.ndarray  # [N, 3] int32: shape, colour, background indices


ATTRIBUTES = ("shape", "colour", "background")


def make_data(seed: int, n: int, tok: Any, memorized_rate: float = 0.02) -> WorldData:
    values = world.all_concepts()
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions, attrs = [], np.empty((n, 3), np.int32)
    for i in tqdm(range(n), desc="drawing the world", unit="img", mininterval=2):
        image, text, scene = world.training_example(np.random.default_rng([seed, i]), IMAGE_SIZE, memorized_rate)
        images[i] = image
        captions.append(text)
        attrs[i] = [values[a].index(getattr(scene, a)) for a in ATTRIBUTES]
    return WorldData(images, tokenize(tok, captions), attrs)


def tokenize(tok: Any, texts: list[str]) -> np.ndarray:
    out = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np")
    return np.asarray(out.input_ids, np.int32)


def attribute_prompts(tok: Any) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every "A photo depicts {concept}" prompt and its (attribute, value) pair."""
    texts, pairs = [], []
    for a, attribute in enumerate(ATTRIBUTES):
        for v, value in enumerate(world.all_concepts()[attribute]):
            texts.append(toy_tokenizer.EVAL_TEMPLATE.format(world.concept_prompt(value)))
            pairs.append((a, v))
    return tokenize(tok, texts), np.asarray(pairs, np.int32)


def to_unit(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 in [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def from_unit(x: jax.Array) -> jax.Array:
    """float in [-1, 1] (a decoder's output) -> uint8, clipped and rounded; the inverse of ``to_unit``."""
    return jnp.round(jnp.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def _map_batches(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int, desc: str | None = None) -> Any:
    """``fn`` over ``x`` in chunks of ``batch`` rows, outputs as NumPy arrays concatenated along the first
    axis (a tuple of outputs stays a tuple); with ``desc``, a progress bar."""
    starts = range(0, len(x), batch)
    if desc is not None:
        starts = tqdm(starts, desc=desc, mininterval=2)
    outs = [jax.tree.map(np.asarray, fn(x[lo : lo + batch])) for lo in starts]
    return jax.tree.map(lambda *chunks: np.concatenate(chunks), *outs)


def clip_pixels(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


# ------------------------------------------------------------------------------------------------ training


def _adamw(lr: float, steps: int, weight_decay: float = 1e-4) -> optax.GradientTransformation:
    warmup = max(1, min(200, steps // 10))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))


def _fit(
    name: str,
    loss_fn: Callable[[Any, dict[str, jax.Array], jax.Array], jax.Array],
    params: Any,
    batches: Callable[[int], dict[str, np.ndarray]],
    steps: int,
    lr: float,
    key: jax.Array,
    ema_decay: float | None = None,
    history: dict[str, list[float]] | None = None,
    trainable: Callable[[tuple[str, ...]], bool] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Any:
    """A plain data-parallel training loop with a progress bar; returns the final (or EMA) parameters.

    Parameters and optimizer state are replicated over every device and each batch is split
    across them (its size must divide by the device count); random draws do not depend on the
    split, so the device count changes results only by float rounding. The loss every 50 steps
    (and at the last) is appended to ``history[name]``. With ``trainable`` (a predicate on
    parameter paths) the other parameters stay fixed. ``mesh`` defaults to every device.
    ``on_step(n)`` hears the number of finished steps every 25 steps and at the end.
    """
    tx = _adamw(lr, steps)
    if trainable is not None:
        labels = traverse_util.path_aware_map(lambda path, _: "train" if trainable(path) else "frozen", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    mesh = sharding.make_mesh() if mesh is None else mesh
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    params = jax.device_put(params, rep)
    opt_state = jax.device_put(tx.init(params), rep)
    ema = params if ema_decay else None

    @functools.partial(jax.jit, out_shardings=(rep, rep, rep, rep))
    def step(params, opt_state, ema, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        return params, opt_state, ema, loss

    bar = tqdm(range(steps), desc=name, unit="step", mininterval=2)
    losses = []
    for i in bar:
        batch = jax.device_put(batches(i), data)
        params, opt_state, ema, loss = step(params, opt_state, ema, batch, jax.random.fold_in(key, i))
        if i % 50 == 0 or i == steps - 1 or steps <= 50:
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if not np.isfinite(losses[-1] if losses else 0.0):
            raise FloatingPointError(f"{name}: loss became {losses[-1]} at step {i}")
        if on_step is not None and ((i + 1) % 25 == 0 or i == steps - 1):
            on_step(i + 1)
    print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps")
    if history is not None:
        history[name] = losses
    return ema if ema is not None else params


def _sampler(data_size: int, batch: int, seed: int) -> Callable[[int], np.ndarray]:
    def indices(i: int) -> np.ndarray:
        return np.random.default_rng([seed, i]).integers(0, data_size, batch)

    return indices


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def text_features(model: CLIPModel, params: Any, ids: np.ndarray, batch: int = 2048) -> np.ndarray:
    """Unit-norm projected text features of every row of ``ids``, ``[N, projection_dim]``."""
    run = jax.jit(lambda p, x: _unit(model.apply({"params": p}, x, method=model.get_text_features)))
    return _map_batches(lambda x: run(params, x), ids, batch)


def train_clip(
    data: WorldData, tok: Any, cfg: dict[str, Any], budget: Budget, seed: int, history: dict | None = None,
    init_params: Any = None, vision_only: bool = False, round_trips: np.ndarray | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[CLIPModel, Any]:
    """Contrastive image/caption training plus zero-shot attribute classification.

    ``vision_only`` continues from ``init_params`` with the text tower fixed: the pipeline's
    text encoder is that tower, so the evaluator's eyes can improve without touching it. Its
    caption and prompt features are then computed once, up front, instead of at every step.
    With ``round_trips`` (the drawings after the VAE, aligned with ``data.images``) each image
    of a batch is its round trip with probability 1/2.
    """
    model = CLIPModel.from_config(cfg)
    params = init_params if init_params is not None else model.init_weights(jax.random.key(seed))
    if vision_only:
        seed += 100  # a fresh stream of batches for the second stage
    prompt_ids, prompt_pairs = attribute_prompts(tok)
    pick = _sampler(len(data.images), budget.evaluator_batch if vision_only else budget.clip_batch, seed + 1)
    if vision_only:
        captions = text_features(model, params, data.ids)
        prompts = jnp.asarray(text_features(model, params, prompt_ids))

    def batches(i: int) -> dict[str, np.ndarray]:
        idx = pick(i)
        images = data.images[idx]
        if round_trips is not None:
            after_vae = np.random.default_rng([seed + 4, i]).random(len(idx)) < 0.5
            images = np.where(after_vae[:, None, None, None], round_trips[idx], images)
        if vision_only:
            return dict(images=images, cap=captions[idx], attrs=data.attrs[idx])
        return dict(images=images, ids=data.ids[idx], attrs=data.attrs[idx])

    def loss_fn(params, b, key):
        pixels = clip_pixels(b["images"])
        if vision_only:
            pixels = _degrade(pixels, key)
        img = _unit(model.apply({"params": params}, pixels, method=model.get_image_features))
        if vision_only:
            cap, pro = b["cap"], prompts
        else:
            cap = _unit(model.apply({"params": params}, b["ids"], method=model.get_text_features))
            pro = _unit(model.apply({"params": params}, prompt_ids, method=model.get_text_features))
        scale = jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0)))
        # Image/caption contrastive loss, as CLIP is trained ...
        logits = scale * img @ cap.T  # [B, B]
        labels = jnp.arange(img.shape[0])
        loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2
        # ... plus zero-shot classification of each attribute among its "A photo depicts ..." prompts,
        # which is what the evaluator is used for.
        for a in range(len(ATTRIBUTES)):
            rows = np.flatnonzero(prompt_pairs[:, 0] == a)
            attr_logits = scale * img @ pro[rows].T  # [B, n_values]
            loss += optax.softmax_cross_entropy_with_integer_labels(attr_logits, b["attrs"][:, a]).mean()
            if not vision_only:
                # Captions are pulled towards their own values' prompts too. The text tower learns words
                # long before the small ViT learns shapes, and without this term it never separates values
                # the images do not yet tell apart: "square" and "heart" ended up at cosine 1.00. The
                # pipeline conditions on this tower, so its separation matters beyond the evaluator.
                cap_logits = scale * cap @ pro[rows].T
                loss += optax.softmax_cross_entropy_with_integer_labels(cap_logits, b["attrs"][:, a]).mean()
        return loss

    if vision_only:
        frozen_text = lambda path: not path[0].startswith("text")  # noqa: E731
        params = _fit("evaluator", loss_fn, params, batches, budget.evaluator_steps, 1e-3, jax.random.key(seed + 3),
                      history=history, trainable=frozen_text, on_step=on_step)
    else:
        params = _fit("clip", loss_fn, params, batches, budget.clip_steps, 2e-3, jax.random.key(seed + 3),
                      history=history, on_step=on_step)
    return model, params


def _degrade(pixels: jax.Array, key: jax.Array) -> jax.Array:
    """Blurs half the images by a random amount and adds a little noise to all.

    The evaluator reads generated images, which are softer and noisier than drawn ones; training its
    eyes on degraded drawings keeps its readings of generated images close to those of drawings.
    """
    k_pick, k_amount, k_noise, k_std = jax.random.split(key, 4)
    n = pixels.shape[0]
    kernel = jnp.asarray([1.0, 2.0, 1.0]) / 4.0
    blurred = pixels
    for axis in (1, 2):  # separable [1, 2, 1] blur, edges repeated
        pad = [(0, 0)] * 4
        pad[axis] = (1, 1)
        padded = jnp.pad(blurred, pad, mode="edge")
        size = pixels.shape[axis]
        blurred = sum(w * jax.lax.slice_in_dim(padded, i, i + size, axis=axis) for i, w in enumerate(kernel))
    amount = jax.random.uniform(k_amount, (n, 1, 1, 1)) * (jax.random.uniform(k_pick, (n, 1, 1, 1)) < 0.5)
    std = 0.1 * jax.random.uniform(k_std, (n, 1, 1, 1))  # up to ~6 grey levels, in CLIP's normalised units
    return pixels + amount * (blurred - pixels) + std * jax.random.normal(k_noise, pixels.shape)


def train_vae(data: WorldData, budget: Budget, seed: int, history: dict | None = None,
              on_step: Callable[[int], None] | None = None) -> tuple[AutoencoderKL, Any]:
    model = AutoencoderKL.from_config(VAE_CONFIG)
    params = model.init_weights(jax.random.key(seed))
    pick = _sampler(len(data.images), budget.vae_batch, seed + 11)

    def batches(i: int) -> dict[str, np.ndarray]:
        return dict(images=data.images[pick(i)])

    def loss_fn(params, b, key):
        x = to_unit(b["images"])
        mean, logvar = model.apply({"params": params}, x, method=model.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        rec = model.apply({"params": params}, z, method=model.decode)
        kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
        return jnp.mean(jnp.abs(rec - x)) + jnp.mean((rec - x) ** 2) + 1e-4 * kl

    params = _fit("vae", loss_fn, params, batches, budget.vae_steps, 2e-3, jax.random.key(seed + 12), history=history,
                  on_step=on_step)
    return model, params


def decode_latents(vae: AutoencoderKL, params: Any, means: np.ndarray, batch: int = 512) -> np.ndarray:
    """uint8 images decoded from posterior means: the drawings' round trips through the VAE."""
    dec = jax.jit(lambda p, z: from_unit(vae.apply({"params": p}, z, method=vae.decode)))
    return _map_batches(lambda z: dec(params, z), means, batch, "decoding round trips")


def encode_latents(vae: AutoencoderKL, params: Any, images: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and standard deviations of every image, ``[N, h, w, 4]`` each."""
    enc = jax.jit(lambda p, x: vae.apply({"params": p}, to_unit(x), method=vae.encode))

    def mean_std(x: np.ndarray) -> tuple[jax.Array, jax.Array]:
        m, lv = enc(params, x)
        return m, jnp.exp(0.5 * lv)

    return _map_batches(mean_std, images, batch, "encoding latents")


def train_unet(
    data: WorldData, means: np.ndarray, stds: np.ndarray, scale: float, text: CLIPTextModel, text_params: Any,
    cfg: dict[str, Any], budget: Budget, seed: int, empty_ids: np.ndarray, history: dict | None = None,
) -> tuple[UNet2DConditionModel, Any]:
    model = UNet2DConditionModel.from_config(cfg)
    params = model.init_weights(jax.random.key(seed))
    sched = schedule_lib.Schedule.from_config(SCHEDULER_CONFIG)
    pick = _sampler(len(data.images), budget.unet_batch, seed + 21)
    # The text encoder is frozen, so every caption's hidden states are computed once, up front.
    encode = jax.jit(lambda p, x: text.apply({"params": p}, x).last_hidden_state)
    states = _map_batches(lambda x: encode(text_params, x), np.concatenate([data.ids, empty_ids[None]]), 2048)
    empty = len(data.ids)

    def batches(i: int) -> dict[str, np.ndarray]:
        idx = pick(i)
        drop = np.random.default_rng([seed + 22, i]).random(len(idx)) < CAPTION_DROPOUT
        return dict(mean=means[idx], std=stds[idx], states=states[np.where(drop, empty, idx)])

    def loss_fn(params, b, key):
        k_z, k_t, k_e = jax.random.split(key, 3)
        z0 = scale * (b["mean"] + b["std"] * jax.random.normal(k_z, b["mean"].shape))
        states = b["states"]
        t = jax.random.randint(k_t, (z0.shape[0],), 0, sched.num_train_timesteps)
        noise = jax.random.normal(k_e, z0.shape)
        x_t = schedule_lib.add_noise(sched, z0, noise, t)
        pred = model.apply({"params": params}, x_t, t, states)
        err = jnp.mean((pred - schedule_lib.target(sched, z0, noise, t)) ** 2, axis=(1, 2, 3))
        # Min-SNR weighting (Hang et al., 2023), gamma 5, for epsilon targets: the nearly clean steps,
        # whose noise is hard to guess and matters little to samples, stop dominating the gradient,
        # which shortens training by a large factor at the same quality.
        snr = jnp.asarray(sched.alphas_cumprod)[t] / (1.0 - jnp.asarray(sched.alphas_cumprod)[t])
        return jnp.mean(err * jnp.minimum(snr, MIN_SNR_GAMMA) / snr)

    params = _fit("unet", loss_fn, params, batches, budget.unet_steps, 1e-3, jax.random.key(seed + 23), ema_decay=0.998,
                  history=history)
    return model, params


# ------------------------------------------------------------------------------------------------ saving


def save_pipeline(out: Path, tok_dir: Path, unet_cfg, unet_params, vae_cfg, vae_params, text_cfg, text_params) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_component(out / "unet", unet_params, unet_cfg, "diffusion_pytorch_model.safetensors")
    save_component(out / "vae", vae_params, vae_cfg, "diffusion_pytorch_model.safetensors")
    save_component(out / "text_encoder", text_params, text_cfg, "model.safetensors")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    _copy_tokenizer(tok_dir, out / "tokenizer")
    toy_package.write_marker(out)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def save_clip(out: Path, tok_dir: Path, cfg: dict[str, Any], params: Any) -> None:
    save_component(out, params, cfg, "model.safetensors")
    _copy_tokenizer(tok_dir, out)
    pre = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": IMAGE_SIZE},
               crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=True, do_normalize=True,
               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_rescale=True, rescale_factor=1 / 255,
               resample=3)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    toy_package.write_marker(out)


# ------------------------------------------------------------------------------------------------ main


_VaeStage = tuple[AutoencoderKL, Any, dict[str, Any], np.ndarray, np.ndarray]  # model, params, config, means, stds


def _clip_stage(out: Path, data: WorldData, tok: Any, ccfg: dict[str, Any], budget: Budget, seed: int, history: dict,
                on_step: Callable[[int], None] | None = None) -> Any:
    """Trains the joint CLIP and writes ``out/clip-joint``; returns its parameters."""
    _, params = train_clip(data, tok, ccfg, budget, seed, history, on_step=on_step)
    save_clip(out / "clip-joint", out / "tokenizer", ccfg, params)
    return params


def _vae_stage(out: Path, data: WorldData, budget: Budget, seed: int, history: dict,
               on_step: Callable[[int], None] | None = None) -> _VaeStage:
    """Trains the VAE and writes ``out/vae`` with a ``scaling_factor`` that gives unit-variance latents."""
    vae, vae_params = train_vae(data, budget, seed, history, on_step)
    means, stds = encode_latents(vae, vae_params, data.images)
    # Unit-variance latents, as Stable Diffusion's scaling_factor gives for its own VAE.
    vae_cfg = dict(VAE_CONFIG, scaling_factor=float(1.0 / np.std(means)))
    save_component(out / "vae", vae_params, vae_cfg, "diffusion_pytorch_model.safetensors")
    return vae, vae_params, vae_cfg, means, stds


def _evaluator_stage(out: Path, data: WorldData, tok: Any, ccfg: dict[str, Any], clip_params: Any, vae: AutoencoderKL,
                     vae_params: Any, means: np.ndarray, budget: Budget, seed: int, history: dict,
                     on_step: Callable[[int], None] | None = None) -> None:
    """Trains the evaluator on from the joint CLIP and writes ``out/clip``."""
    round_trips = decode_latents(vae, vae_params, means)
    _, eval_params = train_clip(data, tok, ccfg, budget, seed, history, init_params=clip_params, vision_only=True,
                                round_trips=round_trips, on_step=on_step)
    save_clip(out / "clip", out / "tokenizer", ccfg, eval_params)


def _read_vae(out: Path) -> tuple[AutoencoderKL, Any, dict[str, Any]]:
    from ablate_jax.models.loading import load_component  # noqa: PLC0415

    vae, vae_params = load_component(epath.Path(out / "vae"), AutoencoderKL)
    return vae, vae_params, json.loads((out / "vae" / "config.json").read_text())


def _load_vae(out: Path, data: WorldData) -> _VaeStage:
    vae, vae_params, vae_cfg = _read_vae(out)
    means, stds = encode_latents(vae, vae_params, data.images)
    return vae, vae_params, vae_cfg, means, stds


def clip_job(out: Path, data: WorldData, budget: Budget, seed: int,
             on_step: Callable[[int], None] | None = None) -> dict:
    """Stage 1 on its own, writing ``out/clip-joint``: what a :class:`BesideJob` runs. Returns its losses."""
    tok = load_tokenizer(epath.Path(out / "tokenizer"))
    history: dict[str, list[float]] = {}
    _clip_stage(out, data, tok, clip_config(len(tok), tok.model_max_length), budget, seed, history, on_step)
    return history


def evaluator_job(out: Path, data: WorldData, means: np.ndarray, budget: Budget, seed: int,
                  on_step: Callable[[int], None] | None = None) -> dict:
    """The evaluator stage on its own, from ``out``'s tokenizer, joint CLIP and VAE and the latents'
    posterior ``means``. Returns its losses."""
    from ablate_jax.models.loading import load_clip  # noqa: PLC0415

    tok = load_tokenizer(epath.Path(out / "tokenizer"))
    vae, vae_params, _ = _read_vae(out)
    history: dict[str, list[float]] = {}
    _evaluator_stage(out, data, tok, clip_config(len(tok), tok.model_max_length), load_clip(out / "clip-joint").params,
                     vae, vae_params, means, budget, seed, history, on_step)
    return history


def _run_beside(target: Callable[..., Any], args: tuple, log: str, messages: Any, cpu_devices: int | None,
                niceness: int, parent: int) -> None:
    """A :class:`BesideJob`'s process: output to ``log``, progress and result to ``messages``."""
    if niceness and hasattr(os, "nice"):
        os.nice(niceness)

    def on_step(n: int) -> None:
        if os.getppid() != parent:  # the parent was killed: nobody waits for this stage any more
            os._exit(1)
        messages.put(("step", n))

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        if cpu_devices is not None:
            distributed.set_cpu_devices(cpu_devices)
        result = target(*args, on_step=on_step)
        messages.put(("done", result))
    except BaseException:
        messages.put(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class BesideJob:
    """One stage trained in a second process while this process trains another.

    On a CPU a tiny model's step is hundreds of small ops that mostly run one after another and
    leave cores idle, so two processes get more done than one. Measured on a 2-core machine with a
    device per core: the evaluator at ``niceness`` 19 beside the UNet made 1.3 to 1.7 steps/s
    (7.2 to 8.3 alone) while the UNet kept 7.8 of its 8.0 to 8.4; the CLIP (1.5 steps/s, 2.8 alone)
    and the VAE (2.3, 4.1 alone) side by side at equal priority get 9% more done than one after
    the other. ``target(*args, on_step=...)`` runs in the second process; ``args`` are pickled, so
    arrays travel with them, and each stage is computed exactly as in one process (the weights
    are byte-identical). The process inherits the environment (``XLA_FLAGS`` included) and gets
    this one's CPU device count. Its output goes to ``log``; :meth:`wait` shows its progress and
    returns its result. It ends itself if this process dies. As with any spawned process, a script
    that starts one must keep its top-level work under ``if __name__ == "__main__":``.
    """

    def __init__(self, name: str, target: Callable[..., Any], args: tuple, steps: int, log: Path,
                 niceness: int = 19) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: a forked JAX runtime is unsafe
        self.name, self.steps, self.log = name, steps, Path(log)
        self._messages = ctx.Queue()
        cpu_devices = jax.local_device_count() if jax.default_backend() == "cpu" else None
        self._process = ctx.Process(target=_run_beside, name=f"ablate_jax {name}", daemon=True,
                                    args=(target, args, str(log), self._messages, cpu_devices, niceness, os.getpid()))
        self._process.start()
        self._t0 = time.perf_counter()
        print(f"{name}: training in a second process (pid {self._process.pid}, niceness {niceness}); log: {log}")

    def wait(self) -> tuple[Any, float]:
        """Blocks until the job ends; returns its result and its process's seconds. Raises RuntimeError
        with the job's traceback (or the end of its log) if it failed."""
        finished, bar = 0, None
        try:
            while True:
                try:
                    kind, value = self._messages.get(timeout=1.0 if bar is not None else 0.0)
                except queue.Empty:
                    if bar is None:  # everything said so far is read: the bar starts where the job is
                        bar = tqdm(total=self.steps, initial=finished, desc=f"{self.name} (second process)",
                                   unit="step", mininterval=2)
                        continue
                    if self._process.is_alive():
                        continue
                    try:  # it may have said its last word just before ending
                        kind, value = self._messages.get(timeout=1.0)
                    except queue.Empty:
                        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                        raise RuntimeError(f"{self.name}: its process ended with exit code {self._process.exitcode} "
                                           f"and no result; the end of {self.log}:\n{tail}") from None
                if kind == "step":
                    finished = value
                    if bar is not None:
                        bar.update(value - bar.n)
                elif kind == "done":
                    self._process.join()
                    return value, time.perf_counter() - self._t0
                else:
                    raise RuntimeError(f"{self.name} failed in its process (log: {self.log}):\n{value}")
        finally:
            if bar is not None:
                bar.close()

    def stop(self) -> None:
        """Ends the process if it still runs (this one failed or was interrupted)."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()


def pretrain(out: str | os.PathLike, budget: Budget, seed: int = 0, stages: tuple[str, ...] = STAGES,
             beside: bool = True) -> dict[str, dict]:
    """Runs the stages and writes ``out/clip`` and ``out/pipeline``.

    A stage whose output is already in ``out`` (from an interrupted run) is loaded, not retrained;
    ``stages`` stops after a prefix of ("clip", "vae", "unet"). With ``beside`` on a CPU backend,
    the CLIP trains in a second process while this one trains the VAE, and the evaluator, at the
    lowest priority, while this one trains the UNet (:class:`BesideJob`); the weights are the same
    either way. Returns ``{"seconds": {stage: s}, "losses": {stage: [loss every 50 steps]},
    "beside": {stage: s}}``: ``seconds`` counts this process's time per stage (for a stage trained
    beside, its wait for the second process; a stage found done has no entry), ``beside`` the
    second process's whole time. A script calling this with ``beside`` needs the usual
    ``if __name__ == "__main__":`` guard of multiprocessing.
    """
    from ablate_jax.models.loading import load_clip  # noqa: PLC0415

    out = Path(out)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    beside_timing: dict[str, float] = {}
    history: dict[str, list[float]] = {}
    tok_dir = out / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
        toy_tokenizer.build_world_tokenizer(tok_dir)
    # A stage is done once the file its saving writes last is there: a run stopped while saving
    # retrains that stage.
    done = {
        "clip": (out / "clip-joint" / toy_package.MARKER).exists(),
        "vae": (out / "vae" / "diffusion_pytorch_model.safetensors").exists(),
        "unet": (out / "pipeline" / toy_package.MARKER).exists(),
        "evaluator": (out / "clip" / toy_package.MARKER).exists(),
    }
    beside = beside and jax.default_backend() == "cpu"  # on an accelerator, two processes would share its memory
    jobs: list[BesideJob] = []

    def wait(job: BesideJob) -> None:
        t0 = time.perf_counter()
        losses, beside_timing[job.name] = job.wait()
        jobs.remove(job)
        history.update(losses)
        timing[job.name] = time.perf_counter() - t0

    try:
        t0 = time.perf_counter()
        tok = load_tokenizer(epath.Path(tok_dir))
        data = make_data(seed, budget.examples, tok)
        timing["data"] = time.perf_counter() - t0

        ccfg = clip_config(len(tok), tok.model_max_length)
        clip_beside = beside and "vae" in stages and not done["clip"] and not done["vae"]
        if clip_beside:  # the CLIP trains in a second process while this one trains the VAE
            jobs.append(BesideJob("clip", clip_job, (out, data, budget, seed), budget.clip_steps, out / "clip.log",
                                  niceness=0))
        elif not done["clip"]:
            t0 = time.perf_counter()
            clip_params = _clip_stage(out, data, tok, ccfg, budget, seed, history)
            timing["clip"] = time.perf_counter() - t0
        if "vae" not in stages:
            return {"seconds": timing, "losses": history, "beside": beside_timing}

        t0 = time.perf_counter()
        if done["vae"]:
            vae, vae_params, vae_cfg, means, stds = _load_vae(out, data)
        else:
            vae, vae_params, vae_cfg, means, stds = _vae_stage(out, data, budget, seed, history)
        timing["vae"] = time.perf_counter() - t0
        if clip_beside:
            wait(jobs[-1])
        if clip_beside or done["clip"]:
            clip_params = load_clip(out / "clip-joint").params
        if "unet" not in stages:
            return {"seconds": timing, "losses": history, "beside": beside_timing}

        evaluator_beside = beside and "evaluator" in stages and not done["unet"] and not done["evaluator"]
        if evaluator_beside:  # the evaluator trains at the lowest priority while this process trains the UNet
            jobs.append(BesideJob("evaluator", evaluator_job, (out, data, means, budget, seed),
                                  budget.evaluator_steps, out / "evaluator.log"))
        t0 = time.perf_counter()
        if not done["unet"]:
            tcfg = text_encoder_config(ccfg)
            text = CLIPTextModel.from_config(tcfg)
            text_params = {"text_model": clip_params["text_model"]}
            ucfg = unet_config(ccfg["text_config"]["hidden_size"])
            empty_ids = tokenize(tok, [""])[0]
            scale = float(vae_cfg["scaling_factor"])
            _, unet_params = train_unet(data, means, stds, scale, text, text_params, ucfg, budget, seed, empty_ids,
                                        history)
            save_pipeline(out / "pipeline", tok_dir, ucfg, unet_params, vae_cfg, vae_params, tcfg, text_params)
        timing["unet"] = time.perf_counter() - t0
        if "evaluator" not in stages:
            return {"seconds": timing, "losses": history, "beside": beside_timing}

        if evaluator_beside:
            wait(jobs[-1])
        elif not done["evaluator"]:
            t0 = time.perf_counter()
            _evaluator_stage(out, data, tok, ccfg, clip_params, vae, vae_params, means, budget, seed, history)
            timing["evaluator"] = time.perf_counter() - t0
    finally:
        for job in jobs:
            job.stop()
    line = ", ".join(f"{k} {v:.0f}" for k, v in timing.items())
    if beside_timing:
        line += "; in the second process: " + ", ".join(f"{k} {v:.0f}" for k, v in beside_timing.items())
    print(f"seconds per stage: {line}; total {time.perf_counter() - t_start:.0f}")
    return {"seconds": timing, "losses": history, "beside": beside_timing}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Pretrain the toy world's miniature Stable Diffusion and CLIP.")
    ap.add_argument("--out", required=True, help="output folder (pipeline/ and clip/ are written inside)")
    ap.add_argument("--budget", default="full", choices=sorted(BUDGETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--until", default=STAGES[-1], choices=STAGES, help="stop after this stage")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="on a CPU, split it into this many devices and each batch across them (one per core)")
    ap.add_argument("--one-process", action="store_true",
                    help="train every stage in this process, one after another (on a CPU the default trains the "
                         "CLIP beside the VAE and the evaluator beside the UNet in a second process, to the same "
                         "weights)")
    args = ap.parse_args(argv)
    distributed.tune_cpu_compiler()
    if args.cpu_devices is not None:
        try:
            distributed.set_cpu_devices(args.cpu_devices)
        except distributed.DistributedError as err:
            ap.error(str(err).replace("--cpu_devices", "--cpu-devices"))  # this command's spelling of the flag
    pretrain(args.out, BUDGETS[args.budget], args.seed, STAGES[: STAGES.index(args.until) + 1],
             beside=not args.one_process)


if __name__ == "__main__":
    main()
