"""The ablation objectives on small stand-in denoisers, where every term can be written out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablate_jax.losses import LossConfig, ablation_loss, masked_mse


def _inputs(seed=0, b=3):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (b, 4, 4, 2))
    t = jnp.arange(b)
    ctx = {name: jax.random.normal(k, (b, 5, 6)) for name, k in zip(("target", "anchor", "keep"), ks[1:4], strict=True)}
    noise = jax.random.normal(ks[4], x.shape)
    return x, t, ctx, noise


def _denoiser(w):
    # A denoiser that depends on latents, timestep and context, with parameters w.
    def f(x, t, c):
        return x * w + jnp.mean(c, axis=(1, 2))[:, None, None, None] * w + t[:, None, None, None] * 0.01
    return f


def _contexts(ctx):
    return {"student_target": ctx["target"], "student_anchor": ctx["anchor"], "anchor": ctx["anchor"],
            "student_keep": ctx["keep"], "keep": ctx["keep"]}


def test_masked_mse_counts_only_the_mask():
    pred, target = jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3))
    target = target.at[:, :2].set(5.0)  # wrong only where the mask is 0
    mask = jnp.ones((2, 4, 4, 1)).at[:, :2].set(0.0)
    assert float(masked_mse(pred, target, mask)) == pytest.approx(1.0)
    assert float(masked_mse(pred, target, jnp.ones_like(mask))) == pytest.approx(float(jnp.mean((pred - target) ** 2)))


def test_each_term_matches_its_formula():
    x, t, ctx, noise = _inputs()
    mask = jnp.ones((3, 4, 4, 1))
    student, teacher = _denoiser(1.3), _denoiser(0.7)
    cfg = LossConfig("model_based", "frozen", prior_weight=0.5, preserve_weight=2.0)
    total, terms = ablation_loss(student, teacher, x, t, _contexts(ctx), noise, mask, cfg)
    ablation = jnp.mean((student(x, t, ctx["target"]) - teacher(x, t, ctx["anchor"])) ** 2)
    prior = jnp.mean((student(x, t, ctx["anchor"]) - noise) ** 2)
    keep = jnp.mean((student(x, t, ctx["keep"]) - teacher(x, t, ctx["keep"])) ** 2)
    np.testing.assert_allclose([terms["ablation"], terms["prior"], terms["preserve"]], [ablation, prior, keep], rtol=1e-6)
    np.testing.assert_allclose(total, ablation + 0.5 * prior + 2.0 * keep, rtol=1e-6)

    _, terms = ablation_loss(student, teacher, x, t, _contexts(ctx), noise, mask, LossConfig("noise_based"))
    np.testing.assert_allclose(terms["ablation"], jnp.mean((student(x, t, ctx["target"]) - noise) ** 2), rtol=1e-6)
    assert set(terms) == {"ablation"}


def test_passes_are_batched_into_one_call_per_model():
    x, t, ctx, noise = _inputs()
    calls = {"student": [], "teacher": []}

    def counting(name, f):
        def g(x, t, c):
            calls[name].append(x.shape[0])
            return f(x, t, c)
        return g

    cfg = LossConfig("model_based", "frozen", prior_weight=1.0, preserve_weight=1.0)
    ablation_loss(counting("student", _denoiser(1.0)), counting("teacher", _denoiser(0.5)), x, t, _contexts(ctx),
                  noise, jnp.ones((3, 4, 4, 1)), cfg)
    assert calls == {"student": [9], "teacher": [6]}
    calls = {"student": [], "teacher": []}
    ablation_loss(counting("student", _denoiser(1.0)), counting("teacher", _denoiser(0.5)), x, t, _contexts(ctx),
                  noise, jnp.ones((3, 4, 4, 1)), LossConfig("model_based", "online"))
    assert calls == {"student": [6], "teacher": []}  # the online teacher rides along with the student


def test_online_teacher_is_the_student_under_stop_gradient():
    x, t, ctx, noise = _inputs()
    mask = jnp.ones((3, 4, 4, 1))

    def loss(w, cfg, teacher_w):
        return ablation_loss(_denoiser(w), _denoiser(teacher_w), x, t, _contexts(ctx), noise, mask, cfg)[0]

    # At w equal to the frozen teacher's weights, the two formulations agree in value and gradient:
    # the online teacher contributes no gradient of its own.
    w = 0.9
    online = jax.value_and_grad(loss)(w, LossConfig("model_based", "online"), 123.0)
    frozen = jax.value_and_grad(loss)(w, LossConfig("model_based", "frozen"), w)
    np.testing.assert_allclose(online, frozen, rtol=1e-6)
    # Identical student and frozen teacher and equal prompts: nothing to learn.
    same = {**_contexts(ctx), "student_target": ctx["anchor"]}
    total, _ = ablation_loss(_denoiser(w), _denoiser(w), x, t, same, noise, mask, LossConfig())
    assert float(total) == 0.0


def test_invalid_loss_configs_are_refused():
    with pytest.raises(ValueError, match="needs teacher='frozen'"):
        LossConfig("model_based", "online", preserve_weight=1.0).validate()
    with pytest.raises(ValueError, match="loss must be one of"):
        LossConfig("kl").validate()
    with pytest.raises(ValueError, match="teacher must be one of"):
        LossConfig(teacher="ema").validate()


def test_the_adversarial_term_is_the_ablation_term_under_its_own_context():
    x, t, ctx, noise = _inputs()
    student, teacher = _denoiser(2.0), _denoiser(0.5)
    mask = jnp.ones((3, 4, 4, 1))
    adversarial = ctx["keep"] * 3.0
    for loss in ("model_based", "noise_based"):
        cfg = LossConfig(loss=loss, adversarial_weight=0.7)
        total, terms = ablation_loss(student, teacher, x, t, {**_contexts(ctx), "student_adversarial": adversarial},
                                     noise, mask, cfg)
        goal = teacher(x, t, ctx["anchor"]) if loss == "model_based" else noise
        np.testing.assert_allclose(terms["adversarial"], masked_mse(student(x, t, adversarial), goal, mask), rtol=1e-6)
        np.testing.assert_allclose(total, terms["ablation"] + 0.7 * terms["adversarial"], rtol=1e-6)


def test_a_teacher_anchor_prediction_given_is_used_and_not_computed_again():
    x, t, ctx, noise = _inputs()
    teacher, mask = _denoiser(0.5), jnp.ones((3, 4, 4, 1))
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return teacher(x, t, c)

    cfg = LossConfig("model_based", "frozen", preserve_weight=1.0)
    _, plain = ablation_loss(_denoiser(1.0), teacher, x, t, _contexts(ctx), noise, mask, cfg)
    _, given = ablation_loss(_denoiser(1.0), counting, x, t, _contexts(ctx), noise, mask, cfg,
                             teacher_anchor=teacher(x, t, ctx["anchor"]))
    assert calls == [3]  # the kept concept's pass only
    for k in plain:
        np.testing.assert_allclose(given[k], plain[k], rtol=1e-6)
