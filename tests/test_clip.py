"""Parity of the Flax CLIP models with transformers' PyTorch CLIP on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from ablate_jax.models import clip
from ablate_jax.models.convert import flax_to_torch, torch_to_flax, with_prefix

TOL = 1e-5
BF16_TOL = 5e-2

VOCAB = 100
BOS, EOS = 98, 99  # the two highest ids, as in CLIP's tokenizer (49406, 49407)
MAX_LEN = 16

TEXT_KW = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LEN,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=EOS,
    projection_dim=24,
)
VISION_KW = dict(
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_act="gelu",
)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adds seeded noise to every parameter so no LayerNorm is identity and no bias is zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def save_and_load(model: transformers.PreTrainedModel, tmp: Path) -> tuple[dict, dict[str, np.ndarray]]:
    model.save_pretrained(tmp, safe_serialization=True)
    with open(tmp / "config.json") as f:
        config = json.load(f)
    return config, load_file(str(tmp / "model.safetensors"))


def sd_input_ids(seed: int = 0, batch: int = 3) -> np.ndarray:
    """Ids shaped like Stable Diffusion's: BOS, words, EOS, then EOS padding to the full length."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, MAX_LEN), EOS, np.int64)
    lengths = [3, MAX_LEN - 2, 7][:batch]
    for i, n in enumerate(lengths):
        ids[i, 0] = BOS
        ids[i, 1 : 1 + n] = rng.integers(1, BOS - 1, n)
    return ids


def right_padding_mask(ids: np.ndarray) -> np.ndarray:
    """1 up to and including the first EOS, 0 after it."""
    first_eos = (ids == EOS).argmax(-1)
    return (np.arange(ids.shape[1])[None] <= first_eos[:, None]).astype(np.int64)


def abstract(module) -> dict:
    return jax.eval_shape(module.init_weights, jax.random.key(0))


def drop_buffers(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=[("quick_gelu", EOS), ("gelu", 2), ("gelu_new", EOS)], ids=str)
def text_pair(request, tmp_path_factory):
    hidden_act, eos_token_id = request.param
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(**{**TEXT_KW, "hidden_act": hidden_act, "eos_token_id": eos_token_id})
    pt = perturb(transformers.CLIPTextModel(cfg), seed=1)
    config, tensors = save_and_load(pt, tmp_path_factory.mktemp("text"))
    model = clip.CLIPTextModel.from_config(config)
    params = torch_to_flax(with_prefix(tensors, "text_model"), abstract(model))
    return pt, model, params, config, tensors


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config={**TEXT_KW, "hidden_act": "quick_gelu"}, vision_config=VISION_KW, projection_dim=24
    )
    pt = perturb(transformers.CLIPModel(cfg), seed=2)
    config, tensors = save_and_load(pt, tmp_path_factory.mktemp("clip"))
    model = clip.CLIPModel.from_config(config)
    params = torch_to_flax(tensors, abstract(model))
    return pt, model, params, config, tensors


def pixels(seed: int = 3, batch: int = 2) -> np.ndarray:
    """NCHW float32, roughly CLIP-normalised."""
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def pooled(out) -> np.ndarray:
    """transformers v5 returns an output object from get_*_features; older versions a tensor."""
    out = getattr(out, "pooler_output", out)
    return out.detach().numpy()


# --------------------------------------------------------------------------- text


def test_text_model_parity(text_pair):
    pt, model, params, _, _ = text_pair
    ids = sd_input_ids()
    with torch.no_grad():
        ref = pt(torch.from_numpy(ids))
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) <= TOL
    # The pooled vector is the hidden state at the first EOS (here also the first max id).
    first_eos = (ids == EOS).argmax(-1)
    np.testing.assert_array_equal(
        np.asarray(out.pooler_output), np.asarray(out.last_hidden_state)[np.arange(len(ids)), first_eos]
    )


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_text_model_padding_mask_parity(text_pair, attn_implementation):
    pt, model, params, _, _ = text_pair
    pt.set_attn_implementation(attn_implementation)
    ids = sd_input_ids(seed=5)
    mask = right_padding_mask(ids)
    assert (mask == 0).any()
    try:
        with torch.no_grad():
            ref = pt(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    finally:
        pt.set_attn_implementation("sdpa")
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
        unmasked = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) <= TOL
    # Right padding after EOS cannot change anything up to EOS under a causal mask.
    assert rel_err(out.pooler_output, unmasked.pooler_output) <= TOL


def test_text_model_with_projection_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(**{**TEXT_KW, "hidden_act": "gelu"})
    pt = perturb(transformers.CLIPTextModelWithProjection(cfg), seed=4)
    config, tensors = save_and_load(pt, tmp_path)
    model = clip.CLIPTextModelWithProjection.from_config(config)
    params = torch_to_flax(tensors, abstract(model))
    ids = sd_input_ids(seed=6)
    with torch.no_grad():
        ref = pt(torch.from_numpy(ids))
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert out.text_embeds.shape == (len(ids), TEXT_KW["projection_dim"])
    assert rel_err(out.text_embeds, ref.text_embeds.numpy()) <= TOL
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL


def test_text_param_names(text_pair):
    _, model, params, _, _ = text_pair
    flat = {"/".join(p) for p in _paths(params)}
    for name in (
        "text_model/embeddings/token_embedding/embedding",
        "text_model/embeddings/position_embedding/embedding",
        "text_model/encoder/layers_0/self_attn/k_proj/kernel",
        "text_model/encoder/layers_1/mlp/fc2/bias",
        "text_model/encoder/layers_0/layer_norm1/scale",
        "text_model/final_layer_norm/bias",
    ):
        assert name in flat, name


def _paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        out.extend(_paths(v, (*prefix, k)) if isinstance(v, dict) else [(*prefix, k)])
    return out


def test_text_round_trip(text_pair):
    _, _, params, _, tensors = text_pair
    sd = drop_buffers(with_prefix(tensors, "text_model"))
    back = flax_to_torch(torch_to_flax(sd, params))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


# --------------------------------------------------------------------------- CLIPModel / vision


def test_clip_image_features_parity(clip_pair):
    pt, model, params, _, _ = clip_pair
    x = pixels()
    with torch.no_grad():
        ref = pooled(pt.get_image_features(pixel_values=torch.from_numpy(x)))
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, nhwc(x), method=model.get_image_features)
    assert out.shape == (len(x), 24)
    assert rel_err(out, ref) <= TOL


def test_clip_text_features_parity(clip_pair):
    pt, model, params, _, _ = clip_pair
    ids = sd_input_ids(seed=7)
    mask = right_padding_mask(ids)
    with torch.no_grad():
        ref = pooled(pt.get_text_features(input_ids=torch.from_numpy(ids)))
        ref_masked = pooled(
            pt.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        )
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), method=model.get_text_features)
        out_masked = model.apply(
            {"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), method=model.get_text_features
        )
    assert out.shape == (len(ids), 24)
    assert rel_err(out, ref) <= TOL
    assert rel_err(out_masked, ref_masked) <= TOL


def test_clip_logits_parity(clip_pair):
    pt, model, params, _, _ = clip_pair
    ids = sd_input_ids(seed=8)
    x = pixels(seed=9)
    with torch.no_grad():
        ref = pt(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(x))
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), nhwc(x))
    assert rel_err(out.logits_per_image, ref.logits_per_image.numpy()) <= TOL
    assert rel_err(out.logits_per_text, ref.logits_per_text.numpy()) <= TOL
    assert rel_err(out.text_embeds, ref.text_embeds.numpy()) <= TOL
    assert rel_err(out.image_embeds, ref.image_embeds.numpy()) <= TOL


def test_vision_model_parity(tmp_path):
    torch.manual_seed(0)
    pt = perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW)), seed=5)
    config, tensors = save_and_load(pt, tmp_path)
    model = clip.CLIPVisionModel.from_config(config)
    params = torch_to_flax(with_prefix(tensors, "vision_model"), abstract(model))
    x = pixels(seed=10, batch=3)
    with torch.no_grad():
        ref = pt(pixel_values=torch.from_numpy(x))
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, nhwc(x))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) <= TOL


def test_clip_param_names(clip_pair):
    _, _, params, _, _ = clip_pair
    flat = {"/".join(p) for p in _paths(params)}
    for name in (
        "vision_model/embeddings/class_embedding",
        "vision_model/embeddings/patch_embedding/kernel",
        "vision_model/embeddings/position_embedding/embedding",
        "vision_model/pre_layrnorm/scale",
        "vision_model/post_layernorm/scale",
        "vision_model/encoder/layers_1/self_attn/out_proj/kernel",
        "text_model/encoder/layers_0/self_attn/q_proj/bias",
        "text_projection/kernel",
        "visual_projection/kernel",
        "logit_scale",
    ):
        assert name in flat, name
    assert params["vision_model"]["embeddings"]["class_embedding"].shape == (48,)
    assert params["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 48)
    assert np.shape(params["logit_scale"]) == ()


def test_clip_round_trip(clip_pair):
    _, _, params, _, tensors = clip_pair
    sd = drop_buffers(tensors)
    back = flax_to_torch(torch_to_flax(sd, params))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_init_weights_matches_checkpoint_tree(clip_pair):
    _, model, params, _, _ = clip_pair
    fresh = model.init_weights(jax.random.key(1))
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, params)


# --------------------------------------------------------------------------- dtypes and config


def test_bfloat16_compute_close_to_float32(clip_pair):
    _, model, params, config, _ = clip_pair
    bf16 = clip.CLIPModel.from_config(config, dtype=jnp.bfloat16)
    ids = jnp.asarray(sd_input_ids(seed=11), jnp.int32)
    x = nhwc(pixels(seed=12))
    for method in ("get_text_features", "get_image_features"):
        arg = ids if method == "get_text_features" else x
        ref = model.apply({"params": params}, arg, method=getattr(model, method))
        out = bf16.apply({"params": params}, arg, method=getattr(bf16, method))
        assert out.dtype == jnp.bfloat16
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert rel_err(np.asarray(out, np.float32), ref) < BF16_TOL, method


def test_bfloat16_text_model(text_pair):
    _, model, params, config, _ = text_pair
    bf16 = clip.CLIPTextModel.from_config(config, dtype=jnp.bfloat16)
    ids = jnp.asarray(sd_input_ids(seed=13), jnp.int32)
    ref = model.apply({"params": params}, ids)
    out = bf16.apply({"params": params}, ids)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out.last_hidden_state, np.float32), ref.last_hidden_state) < BF16_TOL
    assert rel_err(np.asarray(out.pooler_output, np.float32), ref.pooler_output) < BF16_TOL


def test_bfloat16_params():
    model = clip.CLIPTextModel.from_config(TEXT_KW, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = model.init_weights(jax.random.key(0))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    out = model.apply({"params": params}, jnp.asarray(sd_input_ids(), jnp.int32))
    assert np.isfinite(np.asarray(out.pooler_output, np.float32)).all()


def test_unsupported_hidden_act_raises():
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPTextModel.from_config({**TEXT_KW, "hidden_act": "xielu"})
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPModel.from_config({"text_config": TEXT_KW, "vision_config": {**VISION_KW, "hidden_act": "mish"}})


def test_config_defaults_and_legacy_keys():
    text = clip.CLIPTextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "ignored_key": 1})
    assert (text.vocab_size, text.max_position_embeddings, text.eos_token_id) == (49408, 77, 49407)
    assert text.hidden_act == "quick_gelu" and text.layer_norm_eps == 1e-5
    # Old CLIPConfig files carry "text_config_dict", which wins over "text_config".
    model = clip.CLIPModel.from_config(
        {"text_config": {"hidden_size": 8}, "text_config_dict": TEXT_KW, "vision_config": VISION_KW}
    )
    assert model.text_config.hidden_size == 32 and model.projection_dim == 512
    with pytest.raises(ValueError, match="multiple"):
        clip.CLIPTextConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="eos_token_id"):
        clip.CLIPTextConfig.from_dict({"eos_token_id": [2, 3]})


def test_jit_and_explicit_xla_attention(text_pair):
    _, model, params, config, _ = text_pair
    xla = clip.CLIPTextModel.from_config(config, attention_implementation="xla")
    ids = jnp.asarray(sd_input_ids(seed=14), jnp.int32)
    with jax.default_matmul_precision("highest"):
        ref = model.apply({"params": params}, ids)
        out = jax.jit(xla.apply)({"params": params}, ids)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert rel_err(out["pooler_output"], ref.pooler_output) <= TOL
