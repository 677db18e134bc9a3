"""Full-size Stable Diffusion and CLIP folders with random weights, for end-to-end runs without a download.

The shapes are those of the released models: SD 1.x (860M UNet, CLIP ViT-L/14 text encoder), SD 2.x
(the 768-pixel v-prediction UNet with linear projections and 1024-wide cross-attention, OpenCLIP-H's
text tower), the KL VAE both share, and a CLIP ViT-L/14 evaluator. The tokenizer is Stable
Diffusion's real one, built from the BPE merges the tests carry. Weights are drawn by PyTorch's own
initialisers from a fixed seed; nothing is fetched.

    python tests/full_models.py OUT_DIR   # writes OUT_DIR/sd1, OUT_DIR/sd2 and OUT_DIR/clip-l14
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tiny_models import VOCAB_SIZE, write_clip_tokenizer

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
_UNET_COMMON = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD1_UNET = dict(**_UNET_COMMON, sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD2_UNET = dict(**_UNET_COMMON, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=True)
# CLIP ViT-L/14's text tower (SD 1.x) and OpenCLIP ViT-H/14's, as SD 2.x ships it (23 of 24 layers).
SD1_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768)
SD2_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu", projection_dim=512)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)


def _text_config(kind: str) -> dict:
    return dict(**(SD1_TEXT if kind == "sd1" else SD2_TEXT), vocab_size=VOCAB_SIZE, max_position_embeddings=77,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def save_sd_pipeline(out: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """A diffusers Stable Diffusion folder of ``kind`` ("sd1" or "sd2") at full size, random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if kind not in ("sd1", "sd2"):
        raise ValueError(f"kind must be sd1 or sd2, got {kind!r}")
    out = Path(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(SD1_UNET if kind == "sd1" else SD2_UNET)).eval()
    vae = AutoencoderKL(**SD_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**_text_config(kind))).eval()
    # diffusers initialises output convolutions to zero; random values there make the run's
    # predictions (and so its checks) depend on every layer.
    with torch.no_grad():
        for module in (unet.conv_out, vae.decoder.conv_out):
            module.weight.normal_(0.0, 0.02)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                  steps_offset=1)
    if kind == "sd1":
        scheduler = PNDMScheduler(**common, skip_prk_steps=True)
    else:
        scheduler = DDIMScheduler(**common, clip_sample=False, prediction_type="v_prediction")
    tok_dir = write_clip_tokenizer(out.parent / f"{out.name}-tokenizer-src")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def save_clip_l14(out: str | Path, seed: int = 0) -> Path:
    """A transformers CLIPModel folder shaped like openai/clip-vit-large-patch14, random weights."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    out = Path(out)
    torch.manual_seed(seed)
    text = {k: v for k, v in _text_config("sd1").items() if k != "projection_dim"}
    vision = {k: v for k, v in CLIP_L14_VISION.items() if k != "projection_dim"}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()
    model.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 224}))
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1])
    save_sd_pipeline(root / "sd1", "sd1")
    save_sd_pipeline(root / "sd2", "sd2", seed=1)
    save_clip_l14(root / "clip-l14")
    print(f"wrote {root}/sd1, {root}/sd2 and {root}/clip-l14")
