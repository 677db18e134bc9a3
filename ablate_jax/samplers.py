"""DDIM and DPM-Solver++(2M) samplers as one jit-able ``lax.fori_loop``.

Both follow diffusers' ``DDIMScheduler`` and ``DPMSolverMultistepScheduler`` (dpmsolver++,
order 2, midpoint) step for step: the timestep grids and every per-step scalar are computed on
the host in float32 in diffusers' operation order, and the loop body applies them to the
latents, so a whole sampling run (and whatever the caller wraps around it, e.g. a VAE decode)
compiles into one XLA program.

Randomness (DDIM with eta > 0) is drawn per image: image ``b`` at step ``i`` uses
``normal(fold_in(key_b, i))``, so an image depends only on its own key and latents, never on
the batch it was sampled in or on how the batch is sharded.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ablate_jax.schedule import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SAMPLERS = ("ddim", "dpmpp_2m")

# Defaults diffusers applies when a config has no "timestep_spacing" key.
_DDIM_DEFAULT_SPACING = "leading"
_DPM_DEFAULT_SPACING = "linspace"

_F32 = np.float32


def _check_num_steps(schedule: Schedule, num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
        raise ValueError(f"num_steps must be a Python int, got {type(num_steps).__name__}")
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if num_steps > schedule.num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} exceeds the schedule's num_train_timesteps={schedule.num_train_timesteps}"
        )


def _check_in_range(schedule: Schedule, timesteps: np.ndarray, num_steps: int) -> None:
    # Large step counts with an offset or coarse integer ratios can push grids off the ends or
    # repeat a timestep; the model was never trained there, so refuse rather than silently clamp.
    if timesteps.min() < 0 or timesteps.max() >= schedule.num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} gives timesteps outside [0, {schedule.num_train_timesteps}) with this schedule"
        )


def ddim_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """DDIM's descending int64 timestep grid ``[num_steps]`` for the schedule's spacing (default "leading")."""
    _check_num_steps(schedule, num_steps)
    n_train = schedule.num_train_timesteps
    spacing = schedule.timestep_spacing or _DDIM_DEFAULT_SPACING
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = n_train // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + schedule.steps_offset
    else:  # trailing
        ratio = n_train / num_steps
        ts = np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
    _check_in_range(schedule, ts, num_steps)
    return np.ascontiguousarray(ts)


def _dpm_last_timestep(schedule: Schedule) -> int:
    """Number of training timesteps left after dropping those with log-SNR/2 below ``lambda_min_clipped``."""
    ac = schedule.alphas_cumprod
    with np.errstate(divide="ignore"):
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(_F32(1.0) - ac))  # [T] float32, decreasing
    clipped = int(np.searchsorted(lambdas[::-1], _F32(schedule.lambda_min_clipped)))
    return schedule.num_train_timesteps - clipped


def dpmpp_2m_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """DPM-Solver's descending int64 timestep grid (default spacing "linspace").

    Its grids split ``[0, last)`` into ``num_steps + 1`` pieces and drop the final point, unlike DDIM's.
    The grid has ``num_steps`` entries except with "trailing" spacing and a ``lambda_min_clipped``
    that removes timesteps: then, as in diffusers, it is shorter and sampling takes fewer steps.
    """
    _check_num_steps(schedule, num_steps)
    last = _dpm_last_timestep(schedule)
    spacing = schedule.timestep_spacing or _DPM_DEFAULT_SPACING
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (num_steps + 1)
        ts = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
    else:  # trailing
        ratio = schedule.num_train_timesteps / num_steps
        ts = np.arange(last, 0, -ratio).round().astype(np.int64) - 1
    _check_in_range(schedule, ts, num_steps)
    if len(np.unique(ts)) != len(ts):
        raise ValueError(f"num_steps={num_steps} is too many for this schedule: the timestep grid has repeats")
    return np.ascontiguousarray(ts)


def _dpm_sigmas(schedule: Schedule, timesteps: np.ndarray) -> np.ndarray:
    """``sigma = sqrt((1 - a) / a)`` at each grid timestep plus the final sigma: ``[num_steps + 1]`` float32."""
    ac = schedule.alphas_cumprod
    sigmas_all = np.sqrt((_F32(1.0) - ac) / ac)  # [T] float32
    sigmas = np.interp(timesteps, np.arange(len(sigmas_all)), sigmas_all)
    last = sigmas_all[0] if schedule.final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last]]).astype(_F32)


def _dpm_tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
    """Per-step float32 scalars ``[n]`` of the dpmsolver++ midpoint update, n = len(grid) (usually num_steps).

    Step i converts the model output at sigma_i to x0 and moves to sigma_{i+1}::

        x <- (s_{i+1}/s_i) x - c_i D0 - (c_i/2) D1,   c_i = alpha_{i+1} (exp(-h) - 1),  h = lambda_{i+1} - lambda_i
        D0 = x0_i,   D1 = (h / (lambda_i - lambda_{i-1})) (x0_i - x0_{i-1})

    First-order steps get a zero ``inv_r0`` so D1 vanishes exactly and the same body serves both.
    """
    ts = dpmpp_2m_timesteps(schedule, num_steps)
    sig = _dpm_sigmas(schedule, ts)  # [n + 1]
    alpha = _F32(1.0) / np.sqrt(sig * sig + _F32(1.0))
    sigma_t = sig * alpha
    with np.errstate(divide="ignore"):
        # sigma_t is 0 at a "zero" final sigma: lambda is +inf there and the step lands on x0.
        lam = np.log(alpha) - np.log(sigma_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = lam[1:] - lam[:-1]
        ratio = sigma_t[1:] / sigma_t[:-1]
        c = alpha[1:] * (np.exp(-h) - _F32(1.0))
        h0 = np.concatenate([[_F32(0.0)], lam[1:-1] - lam[:-2]]).astype(_F32)
        inv_r0 = _F32(1.0) / (h0 / h)

    # A zero final sigma always ends with a first-order step (a second-order one would divide by
    # an infinite h); short runs (< 15 steps) also end first-order, which is more stable there.
    n = len(ts)
    last_first_order = (
        schedule.euler_at_final or (schedule.lower_order_final and n < 15) or schedule.final_sigmas_type == "zero"
    )
    second_order = np.ones(n, dtype=bool)
    second_order[0] = False  # no previous model output yet
    if last_first_order:
        second_order[-1] = False
    inv_r0 = np.where(second_order, inv_r0, _F32(0.0)).astype(_F32)
    return {
        "timesteps": ts.astype(np.int32),
        "alpha": alpha[:-1],
        "sigma": sigma_t[:-1],
        "ratio": ratio.astype(_F32),
        "c": c.astype(_F32),
        "half_c": (_F32(0.5) * c).astype(_F32),
        "inv_r0": inv_r0,
    }


def _ddim_tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
    """Per-step float32 scalars ``[num_steps]`` of the DDIM update from t to ``t - T // num_steps``.

    ``var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)``; a_prev is ``alphas_cumprod[0]`` or 1
    (``set_alpha_to_one``) once the previous timestep falls below 0.
    """
    ts = ddim_timesteps(schedule, num_steps)
    ac = schedule.alphas_cumprod
    final = _F32(1.0) if schedule.set_alpha_to_one else ac[0]
    prev = ts - schedule.num_train_timesteps // num_steps
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(_F32)
    b_t = _F32(1.0) - a_t
    b_prev = _F32(1.0) - a_prev
    var = (b_prev / b_t) * (_F32(1.0) - a_t / a_prev)
    return {
        "timesteps": ts.astype(np.int32),
        "sqrt_a": np.sqrt(a_t),
        "sqrt_b": np.sqrt(b_t),
        "a_prev": a_prev,
        "sqrt_a_prev": np.sqrt(a_prev),
        "sqrt_var": np.sqrt(var).astype(_F32),
    }


def image_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """Normalise ``key`` to one typed PRNG key per image, ``[B]``.

    A batch of keys (``[B]`` typed or ``[B, 2]`` raw) is used as is; a single key gives
    ``fold_in(key, b)`` for ``b = 0..B-1``, i.e. what a caller passing per-image keys built
    from global image indices starting at 0 would get.
    """
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(batch_size))
    if key.shape != (batch_size,):
        raise ValueError(f"expected one key or {batch_size} keys (one per image), got key shape {key.shape}")
    return key


def step_noise(keys: jax.Array, step: int | jax.Array, image_shape: tuple[int, ...]) -> jax.Array:
    """Standard-normal noise ``[B, *image_shape]`` float32 for one sampling step: image b uses ``fold_in(keys[b], step)``."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), image_shape, jnp.float32))(keys)


def _is_static_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _model_output(model_fn: ModelFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """Run the model at one timestep for the whole batch; outputs (e.g. bfloat16) are cast to float32."""
    t_b = jnp.full((x.shape[0],), t, dtype=jnp.int32)  # [B]
    out = model_fn(x, t_b)
    if out.shape != x.shape:
        raise ValueError(f"model_fn returned shape {out.shape}, expected the latents' shape {x.shape}")
    return out.astype(jnp.float32)


def _sample_ddim(
    model_fn: ModelFn, schedule: Schedule, x: jax.Array, key: jax.Array | None, num_steps: int, eta: float | jax.Array
) -> jax.Array:
    tab = {k: jnp.asarray(v) for k, v in _ddim_tables(schedule, num_steps).items()}
    # With a concrete eta of 0 the noise term is skipped at trace time; a traced eta always draws it.
    stochastic = not (_is_static_number(eta) and float(eta) == 0.0)
    if stochastic and key is None:
        raise ValueError("DDIM with eta > 0 needs a key (one key, or one key per image)")
    keys = image_keys(key, x.shape[0]) if stochastic else None
    eta32 = jnp.asarray(eta, jnp.float32)
    std_all = eta32 * tab["sqrt_var"]  # [n]
    dir_all = jnp.sqrt(1.0 - tab["a_prev"] - std_all**2)  # [n]
    eps_pred = schedule.prediction_type == "epsilon"

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        m = _model_output(model_fn, x, tab["timesteps"][i])  # [B, H, W, C]
        sqrt_a, sqrt_b = tab["sqrt_a"][i], tab["sqrt_b"][i]
        if eps_pred:
            x0 = (x - sqrt_b * m) / sqrt_a
            eps = m
        else:
            x0 = sqrt_a * x - sqrt_b * m
            eps = sqrt_a * m + sqrt_b * x
        if schedule.clip_sample:
            x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
        x_prev = tab["sqrt_a_prev"][i] * x0 + dir_all[i] * eps
        if stochastic:
            x_prev = x_prev + std_all[i] * step_noise(keys, i, x.shape[1:])
        return x_prev

    return jax.lax.fori_loop(0, num_steps, body, x)


def _sample_dpmpp_2m(model_fn: ModelFn, schedule: Schedule, x: jax.Array, num_steps: int) -> jax.Array:
    tab = {k: jnp.asarray(v) for k, v in _dpm_tables(schedule, num_steps).items()}
    eps_pred = schedule.prediction_type == "epsilon"

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x, x0_prev = carry  # [B, H, W, C] each; x0_prev is the previous step's data prediction
        m = _model_output(model_fn, x, tab["timesteps"][i])
        alpha, sigma = tab["alpha"][i], tab["sigma"][i]
        x0 = (x - sigma * m) / alpha if eps_pred else alpha * x - sigma * m
        d1 = tab["inv_r0"][i] * (x0 - x0_prev)
        x_next = tab["ratio"][i] * x - tab["c"][i] * x0 - tab["half_c"][i] * d1
        return x_next, x0

    n = tab["timesteps"].shape[0]  # static; below num_steps only for a clipped "trailing" grid
    x, _ = jax.lax.fori_loop(0, n, body, (x, jnp.zeros_like(x)))
    return x


def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    latents: jax.Array,
    key: jax.Array | None,
    *,
    sampler: str,
    num_steps: int,
    eta: float | jax.Array = 0.0,
) -> jax.Array:
    """Denoise ``latents [B, H, W, C]`` (pure noise, init sigma 1) in ``num_steps`` steps; returns float32 x0 latents.

    ``model_fn(x_t [B, H, W, C], t [B] int32)`` returns the raw prediction (epsilon or v, per
    ``schedule.prediction_type``), with any guidance already applied. ``key`` is one key or one key
    per image and is only used by DDIM with ``eta > 0``; ``eta`` in [0, 1] applies to DDIM only.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    _check_num_steps(schedule, num_steps)
    if _is_static_number(eta) and not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    x = jnp.asarray(latents, jnp.float32)
    if sampler == "ddim":
        return _sample_ddim(model_fn, schedule, x, key, num_steps, eta)
    if _is_static_number(eta) and float(eta) != 0.0:
        raise ValueError("eta only applies to the ddim sampler; dpmpp_2m is deterministic")
    return _sample_dpmpp_2m(model_fn, schedule, x, num_steps)


def guided_model_fn(
    apply_unet: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    cond: jax.Array,
    uncond: jax.Array,
    guidance_scale: float | jax.Array,
) -> ModelFn:
    """Classifier-free guidance: ``uncond_out + s * (cond_out - uncond_out)`` from one UNet call on ``[uncond; cond]``.

    ``apply_unet(x [2B, H, W, C], t [2B], context [2B, L, D])``; ``cond`` is ``[B, L, D]`` and
    ``uncond`` is ``[B, L, D]`` or ``[1, L, D]`` (broadcast over the batch).
    """
    uncond = jnp.broadcast_to(uncond, cond.shape)
    context = jnp.concatenate([uncond, cond], axis=0)  # [2B, L, D]

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out = apply_unet(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), context)
        out_uncond, out_cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return model_fn
