"""Samplers against diffusers' scheduler loops, per-image randomness, jit and input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from tiny_models import SD1_SCHEDULER, SD2_SCHEDULER

from ablate_jax import samplers
from ablate_jax.samplers import guided_model_fn, image_keys, sample, step_noise
from ablate_jax.schedule import Schedule

SD1, SD2 = SD1_SCHEDULER, SD2_SCHEDULER
# What a pipeline's scheduler.config carries once loaded: the PNDM default spacing made explicit.
SD1_LEADING = {**SD1, "timestep_spacing": "leading"}
CONFIGS = {"epsilon": SD1, "v_prediction": SD2}

B, H, W, C = 2, 8, 8, 4
_rng = np.random.default_rng(0)
WEIGHTS = (0.5 * _rng.standard_normal(C)).astype(np.float32)  # per-channel gain of the fake model
LATENTS = _rng.standard_normal((B, H, W, C)).astype(np.float32)  # [B, H, W, C]


def jax_model(x, t):
    """Fake denoiser ``tanh(x * w + sin(t / 100))``; x ``[B, H, W, C]``, t ``[B]``."""
    return jnp.tanh(x * WEIGHTS + jnp.sin(t / 100)[:, None, None, None])


def torch_model(x, t):
    """The same function on ``[B, C, H, W]`` tensors and a scalar timestep."""
    return torch.tanh(x * torch.from_numpy(WEIGHTS)[None, :, None, None] + torch.sin(t / 100))


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def torch_sample(scheduler_cls, config, latents, num_steps, eta=0.0, noises=None):
    """diffusers' denoising loop; ``noises[i]`` ``[B, H, W, C]`` is DDIM's variance noise at step i."""
    scheduler = scheduler_cls.from_config(config)
    scheduler.set_timesteps(num_steps)
    x = to_nchw(latents)
    for i, t in enumerate(scheduler.timesteps):
        kwargs = {}
        if scheduler_cls is DDIMScheduler:
            kwargs["eta"] = eta
            if noises is not None:
                kwargs["variance_noise"] = to_nchw(noises[i])
        x = scheduler.step(torch_model(x, t), t, x, **kwargs).prev_sample
    return x.numpy().transpose(0, 2, 3, 1)


# Every step's noise in one compiled call: [num_steps, B, H, W, C] for keys [B].
_all_step_noise = jax.jit(jax.vmap(step_noise, in_axes=(None, 0, None)), static_argnums=2)


def rel_err(got, want):
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler, scheduler_cls", [("ddim", DDIMScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)])
def test_deterministic_samplers_match_diffusers(sampler, scheduler_cls, prediction, num_steps):
    config = CONFIGS[prediction]
    want = torch_sample(scheduler_cls, config, LATENTS, num_steps)
    got = sample(jax_model, Schedule.from_config(config), LATENTS, None, sampler=sampler, num_steps=num_steps)
    assert got.dtype == jnp.float32 and got.shape == LATENTS.shape
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize(
    "config, num_steps",
    [
        (SD1_LEADING, 10),  # pipeline-style config: leading spacing with steps_offset 1
        ({**SD1, "timestep_spacing": "trailing"}, 7),
        ({**SD1, "final_sigmas_type": "sigma_min"}, 20),  # >= 15 steps with a non-zero final sigma: ends second-order
        ({**SD1, "final_sigmas_type": "sigma_min"}, 8),  # short run: lower_order_final makes the last step first-order
        ({**SD1, "timestep_spacing": "trailing", "lambda_min_clipped": -2.0}, 12),  # clipped grid: fewer steps
    ],
    ids=["leading", "trailing", "sigma_min_20", "sigma_min_8", "clipped"],
)
def test_dpmpp_2m_options_match_diffusers(config, num_steps):
    want = torch_sample(DPMSolverMultistepScheduler, config, LATENTS, num_steps)
    got = sample(jax_model, Schedule.from_config(config), LATENTS, None, sampler="dpmpp_2m", num_steps=num_steps)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("config", [SD1_LEADING, {**SD1, "timestep_spacing": "trailing", "set_alpha_to_one": True}])
def test_ddim_spacing_options_match_diffusers(config):
    want = torch_sample(DDIMScheduler, config, LATENTS, 10)
    got = sample(jax_model, Schedule.from_config(config), LATENTS, None, sampler="ddim", num_steps=10)
    assert rel_err(got, want) <= 1e-5


def test_ddim_clip_sample_matches_diffusers():
    # clip_sample defaults to True when a config omits it; an eps model far from the data
    # makes x0 predictions leave [-1, 1] so the clamp is exercised.
    config = {k: v for k, v in SD1.items() if k != "clip_sample"}
    assert Schedule.from_config(config).clip_sample
    want = torch_sample(DDIMScheduler, config, 3 * LATENTS, 10)
    got = sample(jax_model, Schedule.from_config(config), 3 * LATENTS, None, sampler="ddim", num_steps=10)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("prediction, eta", [("epsilon", 0.5), ("v_prediction", 1.0)])
def test_ddim_eta_matches_diffusers_given_the_same_noise(prediction, eta):
    config, num_steps = CONFIGS[prediction], 10
    keys = jax.random.split(jax.random.key(1), B)  # one key per image
    noises = np.asarray(_all_step_noise(keys, jnp.arange(num_steps), (H, W, C)))
    want = torch_sample(DDIMScheduler, config, LATENTS, num_steps, eta=eta, noises=noises)
    got = sample(jax_model, Schedule.from_config(config), LATENTS, keys, sampler="ddim", num_steps=num_steps, eta=eta)
    assert rel_err(got, want) <= 1e-5
    # The noise really entered: the deterministic result is far away.
    det = torch_sample(DDIMScheduler, config, LATENTS, num_steps)
    assert rel_err(got, det) > 1e-2


def test_per_image_keys_make_images_independent_of_the_batch():
    schedule = Schedule.from_config(SD1)
    seed = jax.random.key(7)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(seed, jnp.arange(4))  # global image indices 0..3
    latents = np.random.default_rng(3).standard_normal((4, H, W, C)).astype(np.float32)
    run = jax.jit(functools.partial(sample, jax_model, schedule, sampler="ddim", num_steps=6, eta=1.0))
    batch = np.asarray(run(latents, keys))
    for i in range(4):
        alone = np.asarray(run(latents[i : i + 1], keys[i : i + 1]))
        np.testing.assert_allclose(alone[0], batch[i], rtol=0, atol=1e-6)
    # Reordering the batch just reorders the images.
    perm = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(np.asarray(run(latents[perm], keys[perm])), batch[perm], rtol=0, atol=1e-6)
    # A single key stands for per-image keys fold_in(key, 0..B-1); raw uint32 keys work too.
    np.testing.assert_array_equal(np.asarray(run(latents, seed)), batch)
    np.testing.assert_array_equal(jax.random.key_data(image_keys(seed, 4)), jax.random.key_data(keys))
    raw = image_keys(jax.random.key_data(keys), 4)
    np.testing.assert_array_equal(jax.random.key_data(raw), jax.random.key_data(keys))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 virtual CPU devices from conftest")
def test_per_image_keys_make_images_independent_of_sharding():
    schedule = Schedule.from_config(SD1)
    keys = jax.random.split(jax.random.key(11), 8)
    latents = np.random.default_rng(5).standard_normal((8, H, W, C)).astype(np.float32)
    run = jax.jit(functools.partial(sample, jax_model, schedule, sampler="ddim", num_steps=4, eta=1.0))
    want = np.asarray(run(latents, keys))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("batch",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    got = run(jax.device_put(latents, batch_sharding), jax.device_put(keys, batch_sharding))
    assert len(got.sharding.device_set) == 8  # really ran one image per device
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_whole_sampling_loop_jits_and_matches_eager(sampler):
    schedule = Schedule.from_config(SD2)
    key = jax.random.key(3)
    eta = 1.0 if sampler == "ddim" else 0.0
    eager = sample(jax_model, schedule, LATENTS, key, sampler=sampler, num_steps=10, eta=eta)
    jitted = jax.jit(sample, static_argnums=0, static_argnames=("sampler", "num_steps"))
    # eta goes in traced (for DPM it stays a Python 0.0, which that sampler requires).
    eta_arg = jnp.float32(eta) if sampler == "ddim" else eta
    got = jitted(jax_model, schedule, LATENTS, key, sampler=sampler, num_steps=10, eta=eta_arg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_ddim_traced_eta_zero_equals_deterministic_ddim():
    schedule = Schedule.from_config(SD1)
    det = sample(jax_model, schedule, LATENTS, None, sampler="ddim", num_steps=10)
    run = jax.jit(
        lambda eta: sample(jax_model, schedule, LATENTS, jax.random.key(0), sampler="ddim", num_steps=10, eta=eta)
    )
    np.testing.assert_allclose(np.asarray(run(jnp.float32(0.0))), np.asarray(det), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_denoising_loop_is_a_single_traced_loop(sampler):
    calls = []

    def counting_model(x, t):
        calls.append(x.shape)
        return jax_model(x, t)

    jaxpr = jax.make_jaxpr(
        lambda x: sample(counting_model, Schedule.from_config(SD1), x, None, sampler=sampler, num_steps=25)
    )(LATENTS)
    assert len(calls) == 1  # the model is traced once, inside the loop body
    assert sum(eqn.primitive.name in ("while", "scan") for eqn in jaxpr.jaxpr.eqns) == 1


def test_bfloat16_model_outputs_are_computed_in_float32():
    schedule = Schedule.from_config(SD1)

    def bf16_model(x, t):
        return jax_model(x, t).astype(jnp.bfloat16)

    ref = sample(jax_model, schedule, LATENTS, None, sampler="dpmpp_2m", num_steps=10)
    got = sample(bf16_model, schedule, LATENTS.astype(jnp.bfloat16), None, sampler="dpmpp_2m", num_steps=10)
    assert got.dtype == jnp.float32
    assert rel_err(got, np.asarray(ref)) < 2e-2


def test_guided_model_fn_makes_one_call_on_uncond_then_cond():
    calls = []
    cond = jnp.arange(2 * 3 * 5, dtype=jnp.float32).reshape(2, 3, 5) / 10  # [B, L, D]
    uncond = -jnp.ones((1, 3, 5))  # one empty-prompt embedding for the whole batch

    def apply_unet(x, t, ctx):
        calls.append((x.shape, t.shape, ctx.shape))
        return x * ctx.mean(axis=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000

    x = jnp.asarray(LATENTS)
    t = jnp.array([10, 10], dtype=jnp.int32)
    got = guided_model_fn(apply_unet, cond, uncond, 7.5)(x, t)
    assert calls == [((2 * B, H, W, C), (2 * B,), (2 * B, 3, 5))]
    out_c = x * cond.mean(axis=(1, 2))[:, None, None, None] + 0.01
    out_u = x * -1.0 + 0.01
    np.testing.assert_allclose(got, out_u + 7.5 * (out_c - out_u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "ddim", "num_steps": 0}, "num_steps must be positive"),
        ({"sampler": "dpmpp_2m", "num_steps": -3}, "num_steps must be positive"),
        ({"sampler": "euler", "num_steps": 10}, "unknown sampler"),
        ({"sampler": "ddim", "num_steps": 1001}, "exceeds"),
        ({"sampler": "ddim", "num_steps": 10, "eta": 1.5}, "eta must be in"),
        ({"sampler": "dpmpp_2m", "num_steps": 10, "eta": 0.5}, "eta only applies"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(jax_model, Schedule.from_config(SD1), LATENTS, None, **kwargs)


def test_stochastic_ddim_needs_matching_keys():
    schedule = Schedule.from_config(SD1)
    with pytest.raises(ValueError, match="needs a key"):
        sample(jax_model, schedule, LATENTS, None, sampler="ddim", num_steps=5, eta=1.0)
    with pytest.raises(ValueError, match="one key per image|keys"):
        sample(
            jax_model, schedule, LATENTS, jax.random.split(jax.random.key(0), 3), sampler="ddim", num_steps=5, eta=1.0
        )


def test_timestep_helpers_reject_bad_step_counts():
    schedule = Schedule.from_config(SD1)
    for fn in (samplers.ddim_timesteps, samplers.dpmpp_2m_timesteps):
        with pytest.raises(ValueError, match="positive"):
            fn(schedule, 0)
    # Leading spacing with steps_offset 1 would put t=1000 on the grid: past the last trained timestep.
    with pytest.raises(ValueError, match="outside"):
        samplers.ddim_timesteps(schedule, 1000)
