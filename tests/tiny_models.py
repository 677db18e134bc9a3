"""Tiny random PyTorch reference models, saved in diffusers / transformers format for tests."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

# Stable Diffusion 1.x's scheduler_config.json (a PNDM config); 2.x adds v-prediction.
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "clip_sample": False,
    "trained_betas": None,
}
SD2_SCHEDULER = {**SD1_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

BPE_FILE = Path(__file__).parent / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's vocabulary starts with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, [chr(c) for c in chars], strict=True))


def write_clip_tokenizer(out: str | os.PathLike) -> Path:
    """Writes Stable Diffusion 1.x's CLIP tokenizer (vocab.json, merges.txt, configs) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )
    return out


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def save_and_read(model, path: str | os.PathLike, weights_name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``save_pretrained`` (safetensors), then (config.json as a dict, the tensors as NumPy)."""
    import safetensors.numpy

    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return json.loads((path / "config.json").read_text()), safetensors.numpy.load_file(path / weights_name)


def save_tiny_clip(path: str | os.PathLike, seed: int = 0):
    """A random tiny transformers CLIPModel (32x32 images) with SD's tokenizer, saved to ``path``."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    write_clip_tokenizer(path)
    return model


def _perturb(model, seed: int, std: float = 0.05) -> None:
    """Random weights everywhere: zero-initialised output layers would hide mistakes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and p.shape[0] > 1 and np.allclose(p.detach().numpy(), 1.0):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))  # norm scales stay near 1
            else:
                p.copy_(std * torch.randn(p.shape, generator=g) + 0.5 * p)


TEXT_HIDDEN = 32


def tiny_text_encoder(seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = CLIPTextModel(cfg).eval()
    _perturb(model, seed)
    return model


def tiny_unet(kind: str = "sd1", seed: int = 0, size: str = "tiny"):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8 if size == "tiny" else 16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1 if size == "tiny" else 2,
        block_out_channels=(32, 64) if size == "tiny" else (64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=8,
    )
    if kind == "sd1":
        model = UNet2DConditionModel(**common, attention_head_dim=4)
    elif kind == "sd2":
        model = UNet2DConditionModel(
            **common, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True
        )
    else:
        raise ValueError(kind)
    model.eval()
    _perturb(model, seed + 1)
    return model


def tiny_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()
    _perturb(model, seed + 2)
    return model


def save_tiny_pipeline(out: str | os.PathLike, kind: str = "sd1", seed: int = 0, size: str = "tiny") -> Path:
    """A complete random diffusers Stable Diffusion folder (safetensors) shaped like SD 1.x or 2.x."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(out)
    tok_dir = write_clip_tokenizer(out.parent / f"{out.name}-tokenizer-src")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon" if kind == "sd1" else "v_prediction",
    )
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(kind, seed, size),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
