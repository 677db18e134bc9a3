"""The ablation train step written plainly with diffusers' PyTorch models: the yardstick for bench/train_step.py.

Only what the comparison needs, and never imported by the package: the model-based loss with a
frozen teacher and the ``xattn_kv`` parameter group, i.e. the student (trainable to_k / to_v of
every cross-attention layer) under the target prompt regresses a frozen copy of the UNet under
the anchor prompt, on the same noisy latents, with AdamW after global-norm clipping.

    step = make_reference_step("ablate_jax/toy/assets/pipeline", batch_size=8, lr=3e-4)
    loss = step(images, target_prompts, anchor_prompts)  # images: float [B, 3, H, W] in [-1, 1]
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def trainable_xattn_kv(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Unfreezes the key and value projections of cross-attention (``attn2``) and returns them."""
    chosen = []
    for name, p in unet.named_parameters():
        if ".attn2.to_k." in name or ".attn2.to_v." in name:
            p.requires_grad_(True)
            chosen.append(p)
    if not chosen:
        raise ValueError("this UNet has no cross-attention to_k / to_v weights")
    return chosen


def make_reference_step(folder: str | os.PathLike, batch_size: int, lr: float, *, weight_decay: float = 1e-2,
                        clip_norm: float = 1.0, seed: int = 0) -> Callable[..., float]:
    """``step(images, target_prompts, anchor_prompts) -> loss`` over the pipeline in ``folder``.

    ``images`` is a float tensor ``[batch_size, 3, H, W]`` in [-1, 1]; the prompt lists have
    ``batch_size`` entries. Each call draws the VAE posterior sample, timesteps and noise from
    one torch generator, updates the trainable weights in place and returns the loss.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    # XLA's CPU code flushes subnormal floats to zero; without the same setting, PyTorch's CPU
    # kernels slow down many times over on the tiny values these updates produce (measured on
    # the toy model: ~5 s instead of ~0.4 s a step), which would say nothing about the method.
    torch.set_flush_denormal(True)
    pipe = StableDiffusionPipeline.from_pretrained(os.fspath(folder), safety_checker=None,
                                                   requires_safety_checker=False)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
    teacher = copy.deepcopy(unet)  # frozen; the student starts from the same weights
    params = trainable_xattn_kv(unet)
    unet.train()  # no dropout in these models; only marks the student as the one that learns
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    scale = float(vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed)

    def encode(prompts: Sequence[str]) -> torch.Tensor:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    def step(images: torch.Tensor, target_prompts: Sequence[str], anchor_prompts: Sequence[str]) -> float:
        if images.shape[0] != batch_size:
            raise ValueError(f"expected a batch of {batch_size} images, got {images.shape[0]}")
        with torch.no_grad():
            dist = vae.encode(images).latent_dist
            z0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * scale
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            x_t = noise_sched.add_noise(z0, noise, t)
            # Both prompts through the frozen text encoder in one call.
            states = encode(list(target_prompts) + list(anchor_prompts))
            target_ctx, anchor_ctx = states[:batch_size], states[batch_size:]
            # Teacher and student have different weights, so they are two calls, as in ablate_jax.
            teacher_out = teacher(x_t, t, encoder_hidden_states=anchor_ctx).sample
        student_out = unet(x_t, t, encoder_hidden_states=target_ctx).sample
        loss = F.mse_loss(student_out.float(), teacher_out.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        return float(loss.detach())

    step.unet = unet  # for inspection by callers
    step.trainable = params
    return step
