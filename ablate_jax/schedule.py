"""Discrete-time DDPM noise schedules as immutable host data plus pure JAX helpers.

A :class:`Schedule` holds the training noise levels ``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)``
and the inference options of a diffusers-style scheduler config (timestep spacing, offsets,
prediction type). Its arrays are computed in float32 with the same operation order as
diffusers' PyTorch schedulers, so they agree bit for bit on the same CPU.

Forward process, for integer timesteps ``t`` in ``[0, num_train_timesteps)``::

    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps            (add_noise)
    v   = sqrt(a_t) eps - sqrt(1 - a_t) x0            (velocity)

Latents are channels-last, ``[B, H, W, C]``; anything with a leading batch axis works.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# Config switches that select sigma spacings we do not implement; each must be absent or false.
_UNSUPPORTED_SWITCHES = (
    "thresholding",
    "rescale_betas_zero_snr",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "use_dynamic_shifting",
)


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """float32 linspace with torch's CPU arithmetic: step in float32, fused ``start + step * i``
    for the first half and ``end - step * (num - 1 - i)`` for the second half, each rounded once."""
    start32, end32 = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([start32], dtype=np.float32)
    step = (end32 - start32) / np.float32(num - 1)
    i = np.arange(num, dtype=np.float64)
    # float64 holds the exact product of two float32 values, so one float32 rounding of the
    # float64 result equals a fused multiply-add.
    low = (np.float64(start32) + np.float64(step) * i).astype(np.float32)
    high = (np.float64(end32) - np.float64(step) * (num - 1 - i)).astype(np.float32)
    return np.where(np.arange(num) < num // 2, low, high)


def _cosine_betas(num: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise ``alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)`` (in float64, then float32)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num) / alpha_bar(i / num), max_beta) for i in range(num)]
    return np.asarray(betas, dtype=np.float64).astype(np.float32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> np.ndarray:
    """float32 betas ``[T]`` for ``linear``, ``scaled_linear`` (linear in sqrt(beta)) or ``squaredcos_cap_v2``."""
    if beta_schedule == "linear":
        return _linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return _linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    # The running product is kept in float64 and each prefix rounded to float32, which is what
    # torch's CPU cumprod does for float32 inputs; a float32 running product drifts by ~3e-7.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Training noise levels plus the inference options of one scheduler config.

    Hashable and registered as a static pytree, so it can be closed over or passed straight
    through ``jax.jit``. ``timestep_spacing`` is None when the config did not name one: each
    sampler then applies its own default (DDIM: "leading", DPM-Solver: "linspace").
    """

    num_train_timesteps: int
    betas: np.ndarray  # [T] float32
    alphas_cumprod: np.ndarray  # [T] float32
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    # DPM-Solver options (ignored by DDIM).
    final_sigmas_type: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        """Build from a diffusers scheduler config dict; missing keys take diffusers' defaults.

        Raises ValueError for options that would change the maths in ways not implemented here
        (thresholding, zero-terminal-SNR rescaling, Karras/exponential/beta/flow sigmas,
        ``sample`` prediction, learned variance).
        """
        cfg = {k: v for k, v in dict(config).items() if v is not None}
        for switch in _UNSUPPORTED_SWITCHES:
            if cfg.get(switch, False):
                raise ValueError(f"scheduler config sets {switch}=True, which is not supported")
        if cfg.get("variance_type") in ("learned", "learned_range"):
            raise ValueError("learned-variance models (variance_type learned/learned_range) are not supported")

        num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        if "trained_betas" in cfg:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float64).astype(np.float32)
            if betas.shape != (num_train_timesteps,):
                raise ValueError(f"trained_betas has shape {betas.shape}, expected ({num_train_timesteps},)")
        else:
            betas = make_betas(
                cfg.get("beta_schedule", "linear"),
                num_train_timesteps,
                float(cfg.get("beta_start", 0.0001)),
                float(cfg.get("beta_end", 0.02)),
            )
        alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)

        prediction_type = cfg.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        spacing = cfg.get("timestep_spacing")
        if spacing is not None and spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
        final_sigmas_type = cfg.get("final_sigmas_type", "zero")
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")

        return cls(
            num_train_timesteps=num_train_timesteps,
            betas=_readonly(betas),
            alphas_cumprod=_readonly(alphas_cumprod),
            prediction_type=prediction_type,
            timestep_spacing=spacing,
            steps_offset=int(cfg.get("steps_offset", 0)),
            set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
            clip_sample=bool(cfg.get("clip_sample", True)),
            clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
            final_sigmas_type=final_sigmas_type,
            lower_order_final=bool(cfg.get("lower_order_final", True)),
            euler_at_final=bool(cfg.get("euler_at_final", False)),
            lambda_min_clipped=float(cfg.get("lambda_min_clipped", -math.inf)),
        )

    def _options(self) -> tuple[Any, ...]:
        return tuple(
            getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("betas", "alphas_cumprod")
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self._options() == other._options() and np.array_equal(self.betas, other.betas)

    def __hash__(self) -> int:
        return hash((self._options(), self.betas.tobytes()))


# No array leaves: the schedule is compile-time data, so jit specialises on it instead of tracing it.
jax.tree_util.register_static(Schedule)


def _gather(values: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """``values[t]`` for per-example timesteps ``t [B]``, shaped ``[B, 1, ..., 1]`` to broadcast over ``ndim`` dims."""
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {t.shape}")
    out = jnp.asarray(values)[t]
    return out.reshape(out.shape + (1,) * (ndim - 1))


def _sqrt_alphas(schedule: Schedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """``(sqrt(a_t), sqrt(1 - a_t))``, each ``[B, 1, ..., 1]`` float32."""
    a = _gather(schedule.alphas_cumprod, t, ndim)
    return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward diffusion ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``; x0, noise ``[B, ...]``, t ``[B]`` int."""
    x0, noise = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
    sa, sb = _sqrt_alphas(schedule, t, x0.ndim)
    return sa * x0 + sb * noise


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v-prediction target ``v = sqrt(a_t) noise - sqrt(1 - a_t) x0``; shapes as in :func:`add_noise`."""
    x0, noise = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
    sa, sb = _sqrt_alphas(schedule, t, x0.ndim)
    return sa * noise - sb * x0


def target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Regression target of the denoiser: ``noise`` for epsilon-prediction, :func:`velocity` for v-prediction."""
    if schedule.prediction_type == "epsilon":
        return jnp.asarray(noise, jnp.float32)
    return velocity(schedule, x0, noise, t)


def predict_x0(schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Clean-sample estimate: ``(x_t - sqrt(1-a) eps) / sqrt(a)`` (epsilon) or ``sqrt(a) x_t - sqrt(1-a) v`` (v)."""
    m, x_t = jnp.asarray(model_output, jnp.float32), jnp.asarray(x_t, jnp.float32)
    sa, sb = _sqrt_alphas(schedule, t, x_t.ndim)
    if schedule.prediction_type == "epsilon":
        return (x_t - sb * m) / sa
    return sa * x_t - sb * m


def predict_eps(schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Noise estimate: the output itself (epsilon) or ``sqrt(a) v + sqrt(1-a) x_t`` (v)."""
    m, x_t = jnp.asarray(model_output, jnp.float32), jnp.asarray(x_t, jnp.float32)
    if schedule.prediction_type == "epsilon":
        return m
    sa, sb = _sqrt_alphas(schedule, t, x_t.ndim)
    return sa * m + sb * x_t
