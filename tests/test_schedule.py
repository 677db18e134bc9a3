"""Schedules and the forward process against diffusers' PyTorch schedulers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tiny_models import SD1_SCHEDULER, SD2_SCHEDULER

from ablate_jax import samplers
from ablate_jax.schedule import Schedule, add_noise, predict_eps, predict_x0, target, velocity

# Stable Diffusion 1.x scheduler_config.json (a PNDM config); 2.x adds v-prediction.
SD1, SD2 = SD1_SCHEDULER, SD2_SCHEDULER
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
COSINE = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}


@pytest.mark.parametrize("config", [SD1, LINEAR, COSINE], ids=["scaled_linear", "linear", "cosine"])
@pytest.mark.parametrize("reference", [DDPMScheduler, DDIMScheduler])
def test_betas_and_alphas_cumprod_match_diffusers(config, reference):
    ours = Schedule.from_config(config)
    ref = reference.from_config(config)
    assert ours.betas.dtype == np.float32 and ours.alphas_cumprod.dtype == np.float32
    assert np.abs(ours.betas - ref.betas.numpy()).max() <= 1e-7
    assert np.abs(ours.alphas_cumprod - ref.alphas_cumprod.numpy()).max() <= 1e-7


def test_small_num_train_timesteps_and_trained_betas():
    cfg = {"beta_schedule": "scaled_linear", "num_train_timesteps": 7, "beta_start": 0.1, "beta_end": 0.4}
    ref = DDPMScheduler.from_config(cfg)
    assert np.abs(Schedule.from_config(cfg).alphas_cumprod - ref.alphas_cumprod.numpy()).max() <= 1e-7
    betas = np.linspace(0.001, 0.02, 50).tolist()
    ours = Schedule.from_config({"trained_betas": betas, "num_train_timesteps": 50})
    ref = DDPMScheduler(trained_betas=betas, num_train_timesteps=50)
    assert np.abs(ours.alphas_cumprod - ref.alphas_cumprod.numpy()).max() <= 1e-7


def _with_spacing(config, spacing):
    return dict(config) if spacing is None else {**config, "timestep_spacing": spacing}


@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 2, 10, 25, 50])
def test_timesteps_match_diffusers(spacing, num_steps):
    # None: no key in the config, so each scheduler falls back to its own default spacing.
    cfg = _with_spacing(SD1, spacing)
    schedule = Schedule.from_config(cfg)

    ddim = DDIMScheduler.from_config(cfg)
    ddim.set_timesteps(num_steps)
    np.testing.assert_array_equal(samplers.ddim_timesteps(schedule, num_steps), ddim.timesteps.numpy())

    dpm = DPMSolverMultistepScheduler.from_config(cfg)
    dpm.set_timesteps(num_steps)
    np.testing.assert_array_equal(samplers.dpmpp_2m_timesteps(schedule, num_steps), dpm.timesteps.numpy())
    # torch's vectorised float32 sqrt is not always correctly rounded (numpy's is): allow 1 ulp.
    sigmas = samplers._dpm_sigmas(schedule, samplers.dpmpp_2m_timesteps(schedule, num_steps))
    np.testing.assert_array_max_ulp(sigmas, dpm.sigmas.numpy(), maxulp=1)


def test_dpm_sigma_min_and_lambda_clipping_match_diffusers():
    # lambda_min_clipped=-2 drops the noisiest ~10% of timesteps (SD's lambda reaches about -2.7).
    cfg = {**SD1, "final_sigmas_type": "sigma_min", "lambda_min_clipped": -2.0, "timestep_spacing": "trailing"}
    schedule = Schedule.from_config(cfg)
    dpm = DPMSolverMultistepScheduler.from_config(cfg)
    dpm.set_timesteps(20)
    ts = samplers.dpmpp_2m_timesteps(schedule, 20)
    assert ts[0] < 950
    np.testing.assert_array_equal(ts, dpm.timesteps.numpy())
    np.testing.assert_array_max_ulp(samplers._dpm_sigmas(schedule, ts), dpm.sigmas.numpy(), maxulp=1)


@pytest.mark.parametrize("config", [SD1, SD2], ids=["epsilon", "v_prediction"])
def test_add_noise_velocity_and_target_match_diffusers(config):
    schedule = Schedule.from_config(config)
    ref = DDPMScheduler.from_config(config)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)  # [B, H, W, C]
    noise = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 1, 500, 999])

    ref_xt = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    ref_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    xt = np.asarray(add_noise(schedule, x0, noise, t))
    v = np.asarray(velocity(schedule, x0, noise, t))
    assert np.abs(xt - ref_xt).max() <= 1e-6
    assert np.abs(v - ref_v).max() <= 1e-6

    tgt = np.asarray(target(schedule, x0, noise, t))
    np.testing.assert_array_equal(tgt, noise if config is SD1 else v)


@pytest.mark.parametrize("config", [SD1, SD2], ids=["epsilon", "v_prediction"])
def test_prediction_conversions_invert_the_forward_process(config):
    schedule = Schedule.from_config(config)
    k0, k1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k0, (3, 4, 4, 2))
    noise = jax.random.normal(k1, (3, 4, 4, 2))
    t = jnp.array([5, 400, 990])
    xt = add_noise(schedule, x0, noise, t)
    out = target(schedule, x0, noise, t)  # what a perfect model would predict
    np.testing.assert_allclose(predict_x0(schedule, out, xt, t), x0, atol=2e-4)
    np.testing.assert_allclose(predict_eps(schedule, out, xt, t), noise, atol=2e-4)


def test_schedule_is_static_under_jit_and_hashable():
    a, b = Schedule.from_config(SD1), Schedule.from_config(dict(SD1))
    assert a == b and hash(a) == hash(b)
    assert a != Schedule.from_config(SD2)
    x = jnp.ones((2, 2, 2, 1))
    got = jax.jit(add_noise)(a, x, x, jnp.array([10, 20]))
    np.testing.assert_array_equal(got, add_noise(a, x, x, jnp.array([10, 20])))


@pytest.mark.parametrize(
    "override, match",
    [
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"thresholding": True}, "thresholding"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"beta_schedule": "quadratic"}, "beta_schedule"),
        ({"final_sigmas_type": "denoise_to_zero"}, "final_sigmas_type"),
    ],
)
def test_unsupported_config_raises(override, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_config({**SD1, **override})
