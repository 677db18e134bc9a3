"""The Flax UNet against diffusers' PyTorch UNet2DConditionModel on tiny random models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util
from tiny_models import _perturb, rel_err, save_and_read

from ablate_jax.models.blocks import Conv2D
from ablate_jax.models.convert import flax_path_to_torch_key, flax_to_torch, torch_to_flax
from ablate_jax.models.unet import UNet2DConditionModel

CROSS_DIM = 32

_COMMON = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS_DIM,
    norm_num_groups=8,
)

CONFIGS = {
    # SD 1.x: heads given as one int, 1x1 convolution projections.
    "sd1": dict(_COMMON, layers_per_block=2, attention_head_dim=4),
    # SD 2.x: per-block heads, linear projections, upcast attention.
    "sd2": dict(
        _COMMON,
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=True,
    ),
    # Less common settings: two transformer layers per block, the other sinusoid order and
    # frequency shift, attention in every block, self-attention replaced by cross-attention,
    # other activations, time-embedding options and kernel sizes.
    "variant": dict(
        _COMMON,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=2,
        flip_sin_to_cos=False,
        freq_shift=1,
        only_cross_attention=(True, False),
        mid_block_scale_factor=0.7,
        norm_eps=1e-4,
        act_fn="gelu",
        center_input_sample=True,
        time_embedding_dim=48,
        time_embedding_act_fn="mish",
        timestep_post_act="silu",
        conv_in_kernel=1,
        conv_out_kernel=5,
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per config: (diffusers config dict, PyTorch state dict as NumPy, torch model)."""
    out = {}
    for kind, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = TorchUNet(**cfg).eval()
        _perturb(model, seed=1)
        config, tensors = save_and_read(model, tmp_path_factory.mktemp(f"unet-{kind}"), "diffusion_pytorch_model.safetensors")
        out[kind] = (config, tensors, model)
    return out


def _flax(config, tensors, **kwargs):
    model = UNet2DConditionModel.from_config(config, **kwargs)
    params = torch_to_flax(tensors, jax.eval_shape(model.init_weights, jax.random.key(0)))
    return model, params


def _inputs(height: int, width: int, batch: int = 2, seq: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, height, width, 4)).astype(np.float32)
    context = rng.standard_normal((batch, seq, CROSS_DIM)).astype(np.float32)
    timesteps = np.array([999, 17][:batch], np.int64)
    return sample, timesteps, context


def _torch_forward(model, sample, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(sample.transpose(0, 3, 1, 2)),
            torch.from_numpy(timesteps),
            torch.from_numpy(context),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    ("kind", "size"),
    # (2, 3): both levels are smaller than a 3x3 kernel, which Conv2D computes over patches.
    # (16, 16): 256 tokens at the top level, where CPU attention runs query-blocked.
    [("sd1", (8, 8)), ("sd2", (8, 8)), ("variant", (8, 8)), ("sd1", (7, 5)), ("sd1", (2, 3)),
     ("sd1", (16, 16)), ("sd2", (16, 16))],
)
def test_matches_pytorch(saved, kind, size):
    config, tensors, torch_model = saved[kind]
    model, params = _flax(config, tensors)
    sample, timesteps, context = _inputs(*size)
    want = _torch_forward(torch_model, sample, timesteps, context)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(model.apply)({"params": params}, sample, timesteps, context)
    assert got.shape == want.shape
    err = rel_err(got, want)
    print(f"unet {kind} {size}: rel err {err:.2e}")
    assert err <= 1e-5


def test_scalar_float_timestep_broadcasts(saved):
    config, tensors, torch_model = saved["sd1"]
    model, params = _flax(config, tensors)
    sample, _, context = _inputs(8, 8)
    want = _torch_forward(torch_model, sample, np.array([250, 250]), context)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(model.apply)({"params": params}, sample, jnp.asarray(250.0), context)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_round_trip_is_bit_identical(saved, kind):
    config, tensors, _ = saved[kind]
    _, params = _flax(config, tensors)
    back = flax_to_torch(params)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype, key
        assert np.array_equal(back[key], value), key


def test_parameter_names(saved):
    config, tensors, _ = saved["sd1"]
    _, params = _flax(config, tensors)
    flat = {"/".join(k) for k in traverse_util.flatten_dict(params)}
    for name in (
        "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel",
        "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel",
        "down_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel",
        "down_blocks_0/attentions_0/transformer_blocks_0/ff/net_2/kernel",
        "down_blocks_0/resnets_1/conv1/kernel",
        "down_blocks_0/downsamplers_0/conv/kernel",
        "time_embedding/linear_1/kernel",
        "mid_block/attentions_0/proj_in/kernel",
        "up_blocks_0/upsamplers_0/conv/kernel",
        "conv_norm_out/scale",
    ):
        assert name in flat, name
    assert params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].ndim == 4  # 1x1 conv in SD 1.x


def test_stop_sot_kv_grad():
    # One small block keeps the backward pass quick to compile; attn1 reads the context too.
    config = dict(
        _COMMON,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        layers_per_block=1,
        attention_head_dim=2,
        only_cross_attention=True,
    )
    torch.manual_seed(0)
    torch_model = TorchUNet(**config)
    _perturb(torch_model, seed=1)
    tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    sample, timesteps, context = _inputs(8, 8)
    outputs, grads = {}, {}
    for flag in (False, True):
        model, params = _flax(dict(torch_model.config), tensors, stop_sot_kv_grad=flag)

        def loss(params, context, model=model):
            out = model.apply({"params": params}, sample, timesteps, context)
            return jnp.sum(out**2), out

        with jax.default_matmul_precision("highest"):
            (_, outputs[flag]), grads[flag] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
                params, jnp.asarray(context)
            )
    np.testing.assert_array_equal(outputs[True], outputs[False])
    g_ctx_off, g_ctx_on = np.asarray(grads[False][1]), np.asarray(grads[True][1])
    assert np.abs(g_ctx_off[:, 0]).max() > 0
    assert np.abs(g_ctx_on[:, 0]).max() == 0
    # The other tokens still receive gradient, and the to_k kernels see a different one.
    assert np.abs(g_ctx_on[:, 1:]).max() > 0
    path = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel")
    k_off, k_on = grads[False][0], grads[True][0]
    for p in path:
        k_off, k_on = k_off[p], k_on[p]
    assert not np.allclose(k_off, k_on)


def test_blocked_attention_gradients_match_xla():
    # The train step differentiates through every attention layer: the hand-written backward pass
    # of the query-blocked attention must give the parameter gradients of plain XLA attention.
    # One small block (self- and cross-attention) keeps the backward pass quick to compile.
    config = dict(
        _COMMON,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        layers_per_block=1,
        attention_head_dim=4,
    )
    torch.manual_seed(0)
    torch_model = TorchUNet(**config)
    _perturb(torch_model, seed=1)
    tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    sample, timesteps, context = _inputs(8, 8)
    grads = {}
    for impl in ("blocked", "xla"):
        model, params = _flax(dict(torch_model.config), tensors, attention_implementation=impl)

        def loss(params, model=model):
            out = model.apply({"params": params}, sample, timesteps, context)
            return jnp.sum(out * jnp.cos(out))

        with jax.default_matmul_precision("highest"):
            grads[impl] = jax.jit(jax.grad(loss))(params)
    flat_b, flat_x = traverse_util.flatten_dict(grads["blocked"]), traverse_util.flatten_dict(grads["xla"])
    assert flat_b.keys() == flat_x.keys()
    for key, g in flat_b.items():
        assert rel_err(g, flat_x[key]) <= 1e-4, key


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_bfloat16_compute(saved, kind):
    config, tensors, torch_model = saved[kind]
    sample, timesteps, context = _inputs(8, 8)
    want = _torch_forward(torch_model, sample, timesteps, context)
    model, params = _flax(config, tensors, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    got = jax.jit(model.apply)({"params": params}, sample, timesteps, context)
    assert got.dtype == jnp.bfloat16
    err = rel_err(np.asarray(got.astype(jnp.float32)), want)
    print(f"unet {kind} bf16: rel err {err:.2e}")
    assert err < 5e-2


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D"], "AttnDownBlock2D"),
        ("up_block_types", ["SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "SimpleCrossAttnUpBlock2D"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2DSimpleCrossAttn"),
        ("class_embed_type", "timestep", "timestep"),
        ("addition_embed_type", "text_time", "text_time"),
        ("dual_cross_attention", True, "True"),
        ("some_future_option", 3, "3"),
    ],
)
def test_unsupported_config_raises(saved, key, value, named):
    config = dict(saved["sd1"][0], **{key: value})
    with pytest.raises(ValueError, match=key) as info:
        UNet2DConditionModel.from_config(config)
    assert named in str(info.value)


def _torch_layout_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0])
    return tuple(shape)


SD15 = dict(attention_head_dim=8, cross_attention_dim=768)
SD21 = dict(
    attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True
)


@pytest.mark.parametrize("overrides", [SD15, SD21], ids=["sd15", "sd21"])
def test_full_size_layout_matches(overrides):
    """Full-size SD 1.5 / 2.1 configs: every name and shape matches diffusers (weights never materialised)."""
    with torch.device("meta"):
        torch_model = TorchUNet(**overrides)
    want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    model = UNet2DConditionModel.from_config(dict(torch_model.config))
    abstract = jax.eval_shape(model.init_weights, jax.random.key(0))
    got = {
        flax_path_to_torch_key(path): _torch_layout_shape(path, leaf.shape)
        for path, leaf in traverse_util.flatten_dict(abstract).items()
    }
    assert got == want


@pytest.mark.parametrize(("size", "kernel", "padding"), [
    ((2, 2), 3, ((1, 1), (1, 1))),
    ((1, 2), 3, ((1, 1), (1, 1))),
    ((3, 2), 5, ((2, 1), (1, 2))),
])
def test_conv_smaller_than_its_kernel_matches_pytorch(size, kernel, padding):
    """The patch path of Conv2D (inputs smaller than the kernel) against PyTorch's conv2d."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *size, 16)).astype(np.float32)
    layer = Conv2D(24, kernel, padding=padding)
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["kernel"].shape == (kernel, kernel, 16, 24) and params["bias"].shape == (24,)
    params = {"kernel": params["kernel"], "bias": jnp.asarray(rng.standard_normal(24), jnp.float32)}
    # The patch path is the one taken: no convolution left in the program.
    assert "conv_general_dilated" not in str(jax.make_jaxpr(layer.apply)({"params": params}, x))
    got = np.asarray(jax.jit(layer.apply)({"params": params}, x))
    (pt, pb), (pl, pr) = padding
    xt = torch.nn.functional.pad(torch.from_numpy(x.transpose(0, 3, 1, 2)), (pl, pr, pt, pb))
    wt = torch.from_numpy(np.asarray(params["kernel"]).transpose(3, 2, 0, 1).copy())
    want = torch.nn.functional.conv2d(xt, wt, torch.from_numpy(np.array(params["bias"]))).numpy()
    want = want.transpose(0, 2, 3, 1)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-6


def test_remat_keeps_outputs_and_gradients_and_parameter_names():
    # Two levels, so the up path's upsampler (whose target size is static under remat) runs too;
    # 10x10 latents make it resize to the skip's odd size.
    torch.manual_seed(0)
    torch_model = TorchUNet(**dict(_COMMON, layers_per_block=1, attention_head_dim=2))
    _perturb(torch_model, seed=3)
    tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    sample, timesteps, context = _inputs(10, 10)
    results = {}
    for setting in ("none", "attention", "blocks"):
        model, params = _flax(dict(torch_model.config), tensors, remat=setting)

        def loss(params, model=model):
            out = model.apply({"params": params}, sample, timesteps, context)
            return jnp.sum(out**2), out

        with jax.default_matmul_precision("highest"):
            results[setting] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (_, out_plain), g_plain = results["none"]
    for setting in ("attention", "blocks"):
        (_, out_remat), g_remat = results[setting]
        np.testing.assert_allclose(out_remat, out_plain, rtol=1e-6, atol=1e-6)
        assert jax.tree.structure(g_remat) == jax.tree.structure(g_plain)  # same parameter names
        # Recomputation changes how XLA fuses the backward pass, so the gradients agree to float
        # rounding, measured per parameter as the relative error of the whole tensor.
        for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain), strict=True):
            assert rel_err(a, b) <= 1e-5, setting
