"""The Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL on tiny random models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import traverse_util
from tiny_models import _perturb, rel_err, save_and_read

from ablate_jax.models.convert import flax_path_to_torch_key, flax_to_torch, torch_to_flax
from ablate_jax.models.vae import AutoencoderKL

CONFIGS = {
    "two_blocks": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    ),
    # Three levels (two downsamplers), two resnets per block, non-square input, other options.
    "three_blocks": dict(
        block_out_channels=(8, 16, 16),
        act_fn="mish",
        mid_block_add_attention=False,
        use_post_quant_conv=False,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        latent_channels=3,
        norm_num_groups=4,
        sample_size=16,
    ),
}
INPUT_SIZES = {"two_blocks": (16, 16), "three_blocks": (16, 12)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per config: (diffusers config dict, PyTorch state dict as NumPy, torch model)."""
    out = {}
    for kind, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = TorchVAE(**cfg).eval()
        _perturb(model, seed=2)
        config, tensors = save_and_read(model, tmp_path_factory.mktemp(f"vae-{kind}"), "diffusion_pytorch_model.safetensors")
        out[kind] = (config, tensors, model)
    return out


def _flax(config, tensors, **kwargs):
    model = AutoencoderKL.from_config(config, **kwargs)
    params = torch_to_flax(tensors, jax.eval_shape(model.init_weights, jax.random.key(0)))
    return model, params


def _images(kind: str, batch: int = 2) -> np.ndarray:
    h, w = INPUT_SIZES[kind]
    return np.random.default_rng(0).uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_matches_pytorch(saved, kind):
    config, tensors, torch_model = saved[kind]
    model, params = _flax(config, tensors)
    x = _images(kind)
    with torch.no_grad():
        posterior = torch_model.encode(_nchw(x)).latent_dist
        # A latent unlike the posterior mean, so decode is tested on its own.
        z = np.random.default_rng(1).standard_normal(_nhwc(posterior.mean).shape).astype(np.float32)
        want_image = _nhwc(torch_model.decode(_nchw(z)).sample)
    with jax.default_matmul_precision("highest"):
        mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)
        image = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, z)
    errs = {
        "mean": rel_err(mean, _nhwc(posterior.mean)),
        "logvar": rel_err(logvar, _nhwc(posterior.logvar)),
        "decode": rel_err(image, want_image),
    }
    print(f"vae {kind}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert image.shape == (*x.shape[:3], 3)
    assert all(v <= 1e-5 for v in errs.values()), errs


def test_logvar_is_clipped(saved):
    config, tensors, _ = saved["two_blocks"]
    model, params = _flax(config, tensors)
    # A huge quant_conv bias pushes the raw log-variance far outside [-30, 20].
    latent = model.latent_channels
    bias = np.asarray(params["quant_conv"]["bias"]).copy()
    for shift, bound in ((1e3, 20.0), (-1e3, -30.0)):
        bias[latent:] = shift
        shifted = dict(params, quant_conv=dict(params["quant_conv"], bias=jnp.asarray(bias)))
        _, logvar = model.apply({"params": shifted}, _images("two_blocks"), method=model.encode)
        np.testing.assert_array_equal(np.asarray(logvar), bound)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_round_trip_is_bit_identical(saved, kind):
    config, tensors, _ = saved[kind]
    _, params = _flax(config, tensors)
    back = flax_to_torch(params)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype, key
        assert np.array_equal(back[key], value), key


def test_config_fields_and_names(saved):
    config, tensors, _ = saved["two_blocks"]
    model, params = _flax(config, tensors)
    assert model.scaling_factor == 0.5
    assert model.block_out_channels == (16, 32)
    flat = {"/".join(k) for k in traverse_util.flatten_dict(params)}
    for name in (
        "encoder/mid_block/attentions_0/group_norm/scale",
        "encoder/mid_block/attentions_0/to_out_0/kernel",
        "encoder/down_blocks_0/downsamplers_0/conv/kernel",
        "decoder/up_blocks_0/resnets_1/conv2/kernel",
        "decoder/up_blocks_0/upsamplers_0/conv/kernel",
        "quant_conv/kernel",
        "post_quant_conv/kernel",
    ):
        assert name in flat, name


def test_bfloat16_compute(saved):
    config, tensors, torch_model = saved["two_blocks"]
    x = _images("two_blocks")
    with torch.no_grad():
        want_mean = _nhwc(torch_model.encode(_nchw(x)).latent_dist.mean)
        want_image = _nhwc(torch_model.decode(_nchw(want_mean)).sample)
    model, params = _flax(config, tensors, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    mean, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)
    image = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    assert mean.dtype == jnp.bfloat16 and image.dtype == jnp.bfloat16
    err_mean = rel_err(np.asarray(mean.astype(jnp.float32)), want_mean)
    err_image = rel_err(np.asarray(image.astype(jnp.float32)), want_image)
    print(f"vae bf16: mean {err_mean:.2e}, image {err_image:.2e}")
    assert err_mean < 5e-2 and err_image < 5e-2


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "AttnDownEncoderBlock2D"),
        ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"], "AttnUpDecoderBlock2D"),
        ("act_fn", "tanh", "tanh"),
        ("some_future_option", 3, "3"),
    ],
)
def test_unsupported_config_raises(saved, key, value, named):
    config = dict(saved["two_blocks"][0], **{key: value})
    with pytest.raises(ValueError, match=key if key != "act_fn" else "activation") as info:
        AutoencoderKL.from_config(config)
    assert named in str(info.value)


def test_full_size_layout_matches():
    """The SD 1.x/2.x autoencoder config: every name and shape matches diffusers (weights never materialised)."""
    with torch.device("meta"):
        torch_model = TorchVAE(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
    want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    model = AutoencoderKL.from_config(dict(torch_model.config))
    abstract = jax.eval_shape(model.init_weights, jax.random.key(0))
    got = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        shape = leaf.shape
        if path[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0])
        got[flax_path_to_torch_key(path)] = tuple(shape)
    assert got == want
