"""load_pipeline / load_clip: parity with the PyTorch reference, round trips, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util
from tiny_models import rel_err

from ablate_jax.models import ModelLoadError, load_clip, load_pipeline, save_torch_safetensors
from ablate_jax.models.convert import flax_to_torch


@pytest.fixture(params=["sd1", "sd2"])
def sd_path(request, tiny_sd1_path, tiny_sd2_path):
    return {"sd1": tiny_sd1_path, "sd2": tiny_sd2_path}[request.param]


def test_pipeline_matches_diffusers(sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(sd_path)
    ref = StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None)
    assert pipe.vae_scaling_factor == ref.vae.config.scaling_factor
    assert pipe.scheduler_config["prediction_type"] == ref.scheduler.config.prediction_type

    ids = pipe.tokenizer(["a grumpy cat on a sofa", ""], padding="max_length", max_length=77, return_tensors="np").input_ids
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10, 900], np.int32)
    image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)

    with jax.default_matmul_precision("highest"), torch.no_grad():
        states = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, jnp.asarray(ids)).last_hidden_state
        ref_states = ref.text_encoder(torch.from_numpy(ids).long())[0].numpy()
        assert rel_err(states, ref_states) <= 1e-5

        eps = pipe.unet.apply({"params": pipe.params["unet"]}, latents, t, states)
        ref_eps = ref.unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(t).long(), torch.from_numpy(ref_states)).sample
        assert rel_err(eps, ref_eps.permute(0, 2, 3, 1).numpy()) <= 1e-5

        mean, _ = pipe.vae.apply({"params": pipe.params["vae"]}, image, method=pipe.vae.encode)
        ref_post = ref.vae.encode(torch.from_numpy(image).permute(0, 3, 1, 2)).latent_dist
        assert rel_err(mean, ref_post.mean.permute(0, 2, 3, 1).numpy()) <= 1e-5
        decoded = pipe.vae.apply({"params": pipe.params["vae"]}, latents, method=pipe.vae.decode)
        ref_decoded = ref.vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
        assert rel_err(decoded, ref_decoded.permute(0, 2, 3, 1).numpy()) <= 1e-5


def test_torch_to_flax_to_torch_is_bit_identical(tiny_sd1_path):
    pipe = load_pipeline(tiny_sd1_path)
    files = {
        "unet": "unet/diffusion_pytorch_model.safetensors",
        "vae": "vae/diffusion_pytorch_model.safetensors",
        "text_encoder": "text_encoder/model.safetensors",
    }
    for name, rel in files.items():
        original = safetensors.numpy.load_file(tiny_sd1_path / rel)
        if name == "text_encoder":  # transformers >= 5 writes it without the "text_model." level
            original = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in original.items()}
        original.pop("text_model.embeddings.position_ids", None)
        back = flax_to_torch(pipe.params[name])
        assert sorted(back) == sorted(original), name
        for key, value in original.items():
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_flax_to_safetensors_to_flax_is_bit_identical(tiny_sd2_path, tmp_path):
    pipe = load_pipeline(tiny_sd2_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd2_path, copy)
    save_torch_safetensors(pipe.params["unet"], copy / "unet" / "diffusion_pytorch_model.safetensors")
    again = load_pipeline(copy)
    flat_a = traverse_util.flatten_dict(pipe.params["unet"])
    flat_b = traverse_util.flatten_dict(again.params["unet"])
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        assert np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k])), k


def test_load_clip_matches_transformers(tmp_path):
    from tiny_models import save_tiny_clip

    ref = save_tiny_clip(tmp_path)
    clip = load_clip(tmp_path)
    assert clip.image_size == 32
    ids = clip.tokenizer(["A photo depicts a cat"], padding="max_length", max_length=77, return_tensors="np").input_ids
    pixels = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"), torch.no_grad():
        text = clip.model.apply({"params": clip.params}, jnp.asarray(ids), method=clip.model.get_text_features)
        image = clip.model.apply({"params": clip.params}, jnp.asarray(pixels), method=clip.model.get_image_features)
        ref_text = ref.get_text_features(input_ids=torch.from_numpy(ids).long())
        ref_image = ref.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    ref_text = getattr(ref_text, "pooler_output", ref_text)
    ref_image = getattr(ref_image, "pooler_output", ref_image)
    assert rel_err(text, ref_text.numpy()) <= 1e-5
    assert rel_err(image, ref_image.numpy()) <= 1e-5


# ---------------------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_pipeline_on_a_bucket_loads_like_the_local_folder(tiny_sd1_path, gcs_bucket):
    from etils import epath

    url = f"{gcs_bucket}/models/sd1"
    for f in tiny_sd1_path.rglob("*"):
        if f.is_file():
            epath.Path(f"{url}/{f.relative_to(tiny_sd1_path).as_posix()}").write_bytes(f.read_bytes())
    remote, local = load_pipeline(url), load_pipeline(tiny_sd1_path)
    assert jax.tree.structure(remote.params) == jax.tree.structure(local.params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), remote.params, local.params))
    prompt = "a grumpy cat on a sofa"
    assert remote.tokenizer(prompt).input_ids == local.tokenizer(prompt).input_ids
    assert remote.scheduler_config == local.scheduler_config


def test_refuses_pickled_weights(tiny_sd1_path, tmp_path):
    folder = _copy(tiny_sd1_path, tmp_path / "m")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match=r"unet.*only pickled weights \(diffusion_pytorch_model\.bin\).*safetensors"):
        load_pipeline(folder)


def test_refuses_pickled_single_file(tmp_path):
    ckpt = tmp_path / "sd-v1-4.ckpt"
    ckpt.write_bytes(b"never unpickled")
    with pytest.raises(ModelLoadError, match="pickled checkpoint"):
        load_pipeline(ckpt)


def test_missing_component(tiny_sd1_path, tmp_path):
    folder = _copy(tiny_sd1_path, tmp_path / "m")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelLoadError, match=r"missing the component folder vae/"):
        load_pipeline(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere")


def _rewrite(path, fn):
    tensors = safetensors.numpy.load_file(path)
    fn(tensors)
    safetensors.numpy.save_file(tensors, path)


def test_wrong_shape_names_the_tensor(tiny_sd1_path, tmp_path):
    folder = _copy(tiny_sd1_path, tmp_path / "m")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"

    def shrink(t):
        t[key] = t[key][:, :-1]

    _rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors", shrink)
    with pytest.raises(ModelLoadError, match=rf"{key}: checkpoint shape \(32, 31\)"):
        load_pipeline(folder)


def test_missing_and_unexpected_tensors_are_named(tiny_sd1_path, tmp_path):
    folder = _copy(tiny_sd1_path, tmp_path / "m")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    _rewrite(path, lambda t: t.pop("decoder.conv_norm_out.bias"))
    with pytest.raises(ModelLoadError, match=r"missing tensor for parameter 'decoder/conv_norm_out/bias'"):
        load_pipeline(folder)
    _rewrite(path, lambda t: t.update({"decoder.conv_norm_out.bias": np.zeros(16, np.float32),
                                       "decoder.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'decoder.extra.weight'"):
        load_pipeline(folder)


def test_unsupported_config_is_named(tiny_sd1_path, tmp_path):
    folder = _copy(tiny_sd1_path, tmp_path / "m")
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["down_block_types"] = ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unet/config.json: .*SimpleCrossAttnDownBlock2D"):
        load_pipeline(folder)
