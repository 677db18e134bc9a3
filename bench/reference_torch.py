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


def reference_job(folder: str | os.PathLike, clip_folder: str | os.PathLike, *, anchor_prompts: Sequence[str],
                  num_anchors: int, anchor_steps: int, anchor_guidance: float, anchor_batch: int,
                  train_steps: int, batch_size: int, lr: float, target: str, anchor: str,
                  eval_sets: Sequence[tuple[Sequence[str], str]], eval_steps: int, eval_eta: float,
                  eval_guidance: float, eval_batch: int, seed: int = 0) -> tuple[dict[str, float], list[float]]:
    """The whole job with diffusers and transformers, for its wall time by stage.

    Anchors: DPM-Solver++(2M) with guidance, image i from prompt i mod P. Training: ``train_steps``
    reference steps on those images, target prompts made by replacing the anchor word. Evaluation:
    for every ``(prompts, concept)`` set, the base and the ablated UNet draw one image per prompt
    with DDIM, and CLIP scores every image against the set's concept. Returns seconds per stage and
    the mean CLIP score of each set (base, ablated, in set order).
    """
    import time  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: PLC0415
    from transformers import CLIPModel, CLIPTokenizer  # noqa: PLC0415

    torch.set_flush_denormal(True)
    timing: dict[str, float] = {}
    pipe = StableDiffusionPipeline.from_pretrained(os.fspath(folder), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def draw(prompts: Sequence[str], steps: int, guidance: float, batch: int, eta: float = 0.0) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for lo in range(0, len(prompts), batch):
            with torch.no_grad():
                out.append(pipe(list(prompts[lo:lo + batch]), num_inference_steps=steps, guidance_scale=guidance,
                                eta=eta, generator=gen, output_type="np").images)
        return np.concatenate(out)

    t0 = time.perf_counter()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    prompts = [anchor_prompts[i % len(anchor_prompts)] for i in range(num_anchors)]
    images = draw(prompts, anchor_steps, anchor_guidance, anchor_batch)
    timing["anchors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step = make_reference_step(folder, batch_size, lr, seed=seed)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1
    order = np.random.default_rng(seed).permutation(num_anchors)
    for s in range(train_steps):
        idx = [order[(s * batch_size + j) % num_anchors] for j in range(batch_size)]
        anchor_batch_prompts = [prompts[i] for i in idx]
        step(pixels[idx], [p.replace(anchor, target) for p in anchor_batch_prompts], anchor_batch_prompts)
    timing["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    import json  # noqa: PLC0415

    clip = CLIPModel.from_pretrained(os.fspath(clip_folder)).eval()
    clip_tok = CLIPTokenizer.from_pretrained(os.fspath(clip_folder))
    size = clip.config.vision_config.image_size
    pre_file = os.path.join(os.fspath(clip_folder), "preprocessor_config.json")
    pre = json.load(open(pre_file)) if os.path.exists(pre_file) else {}  # noqa: SIM115
    mean = torch.tensor(pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])).view(1, 3, 1, 1)
    std = torch.tensor(pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])).view(1, 3, 1, 1)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    base_unet = pipe.unet
    scores: list[float] = []  # mean CLIP score per set, base then ablated
    for set_prompts, concept in eval_sets:
        for unet in (base_unet, step.unet):
            pipe.unet = unet
            imgs = draw(list(set_prompts), eval_steps, eval_guidance, eval_batch, eta=eval_eta)
            with torch.no_grad():
                x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
                if x.shape[-1] != size:
                    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
                img_emb = F.normalize(clip.get_image_features(pixel_values=(x - mean) / std).pooler_output, dim=-1)
                ids = clip_tok([f"A photo depicts {concept}"], padding="max_length", return_tensors="pt").input_ids
                txt_emb = F.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1)
                scores.append(float((img_emb @ txt_emb.T).mean()))
    pipe.unet = base_unet
    timing["eval"] = time.perf_counter() - t0
    return timing, scores
