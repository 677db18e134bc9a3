"""Attacks that try to bring a removed concept back (docs/attacks.md), run against the base and the ablated model.

Each attack yields prompts (and, for the learned embedding, parameters) that
:func:`ablate_jax.evaluate.evaluate_run` draws with held-out seeds and scores: its success rate is
the fraction of images the evaluator reads as the target rather than the anchor or one of the
concept's neighbours (for a memorized image: copies by the memorization measure). The attacks:

- ``misspelling``: one-letter variants of the word that names the target (doubled, dropped,
  swapped, substituted, inserted letter, split word), each tokenised differently from the word
  and from each other, in the target set's prompts; then ``misspelling_best``, the variant with
  the highest rate against each model drawn again on seeds of its own (the attacker's pick,
  measured without the upward bias of the largest of several rates on the same images);
- ``paraphrase``: the concept's paraphrase sets (descriptions that avoid the name);
- ``embedding``: textual inversion against the attacked model. One token's embedding row
  (a word no prompt of the concept uses) is optimised with the denoising loss on images the base
  model draws for target prompts, starting from the anchor word's embedding; the target prompts
  then name that token instead of the target word;
- ``search``: a discrete prompt search in the manner of UnlearnDiffAtk: ``attack.search_tokens``
  words put before the target prompts, chosen one position at a time among
  ``attack.search_candidates`` random vocabulary words by the attacked model's denoising loss
  towards the same target images, for ``attack.search_steps`` rounds.

The learned attacks run against each model separately, so the base model's rate says whether
the attack can draw the target at all (an attack that fails there is broken, not a defence).

With the search comes a control, ``search_without_target`` (kind ``control``): the prefix the
search found against the ablated model (against the base model when only that one is measured),
before the target prompts with every name of the target replaced by the anchor, drawn by every
model. It says how often that prefix draws the target without naming it: where the control's rate
matches the search's, the search found words that compose the target from other concepts (which
the base model composes as well), not a way back to the removed name.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ablate_jax import concepts, sharding, text_to_image
from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax.models.loading import Pipeline
from ablate_jax.schedule import Schedule, add_noise, target

log = logging.getLogger(__name__)

KINDS = config_lib.ATTACKS
# The images the learned attacks fit, and their noise, come from fold_in(key(seed), ATTACK_STREAM):
# never the seeds their success is measured on.
ATTACK_STREAM = 0x61747461  # "atta" in ASCII


# The best misspelling, chosen on the variants' draws and drawn again on seeds of its own.
BEST_MISSPELLING = "misspelling_best"


class AttackError(ValueError):
    """An attack that cannot run as configured; the message says why."""


@dataclasses.dataclass(frozen=True)
class Attack:
    """Prompts to draw with one model (and that model's parameters with the attack's learned token, if any)."""

    name: str
    kind: str
    prompts: tuple[str, ...]
    params: Mapping[str, Any] | None = None  # None: the model's own parameters
    detail: str = ""  # what the attack found (the misspelled word, the token, the prefix and its loss)


def _target_set(concept: concepts.Concept) -> concepts.EvalSet:
    sets = [s for s in concept.eval_sets if s.role == "target"]
    if not sets:
        raise AttackError("the concept has no evaluation set with role 'target' to attack")
    return sets[0]


def _word(concept: concepts.Concept) -> str:
    return concepts.target_word(concept.targets, concept.anchor)


def _ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------------------------------------ fixed prompts


def misspelling_attacks(concept: concepts.Concept, tokenizer: Any) -> list[Attack]:
    """One attack per one-letter variant of the target's word that tokenises unlike the word and the others."""
    word = _word(concept)
    base = _target_set(concept)
    seen = {_ids(tokenizer, word)}
    out = []
    for kind, wrong in concepts.misspellings(word, extended=True).items():
        ids = _ids(tokenizer, wrong)
        if ids in seen:
            continue
        seen.add(ids)
        prompts = tuple(concepts.replace_word(p, word, wrong) for p in base.prompts)
        if prompts != base.prompts:
            out.append(Attack(f"misspelling_{kind}", "misspelling", prompts, detail=wrong))
    return out


def best_misspelling(measured: Sequence[tuple[Attack, float]]) -> Attack:
    """The attacker's pick among misspellings measured against one model (each with its success rate):
    the variant with the highest rate (the first of equals), as an attack of its own
    (:data:`BEST_MISSPELLING`) to be drawn on fresh seeds, since the largest of several rates measured
    on the same images is biased upwards."""
    if not measured:
        raise AttackError("no misspelling was measured to choose from")
    attack, rate = max(measured, key=lambda pair: pair[1])
    return Attack(BEST_MISSPELLING, "misspelling", attack.prompts,
                  detail=f"{attack.detail} ({attack.name}: {rate:.2f} on the variants' draws)")


def paraphrase_attacks(concept: concepts.Concept) -> list[Attack]:
    """The concept's paraphrase sets (its misspelling sets are the misspelling attack's business)."""
    return [Attack(f"paraphrase_{s.name}", "paraphrase", s.prompts)
            for s in concept.eval_sets if s.role == "target_paraphrase" and "_misspelled_" not in s.name]


# ------------------------------------------------------------------------------------------------ learned attacks


@dataclasses.dataclass(frozen=True)
class TargetImages:
    """What the learned attacks fit: the base model's drawings of target prompts, as latents."""

    prompts: tuple[str, ...]
    latents: np.ndarray  # [N, h, w, c], scaled like the UNet's inputs


def target_images(spec: config_lib.Spec, pipeline: Pipeline, mesh: jax.sharding.Mesh) -> TargetImages:
    """``attack.images`` images the base model draws for training-style target prompts (the attack stream)."""
    config, concept = spec.config, spec.concept
    n = int(config.attack.images)
    usable = concept.usable_anchor_prompts()
    prompts = tuple(concept.target_prompt(usable[i % len(usable)], i) for i in range(n))
    key = jax.random.fold_in(jax.random.key(config.seed), ATTACK_STREAM)
    # The evaluation's batch rule: one compiled shape, no larger than the draw needs.
    batch = min(sharding.round_up(int(config.eval.batch_size), mesh.devices.size),
                sharding.round_up(n, mesh.devices.size))
    images = text_to_image.draw(pipeline, pipeline.params, list(prompts), key, config_lib.anchor_sampling(config),
                                batch_size=batch, mesh=mesh)
    return TargetImages(prompts, np.asarray(_encode(pipeline)(pipeline.params["vae"], images)))


@functools.lru_cache(maxsize=4)
def _encode(pipeline: Pipeline):
    vae, scale = pipeline.vae, pipeline.vae_scaling_factor

    @jax.jit
    def encode(vae_params, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        mean, _ = vae.apply({"params": vae_params}, x, method=vae.encode)
        return mean.astype(jnp.float32) * scale

    return encode


@functools.lru_cache(maxsize=4)
def _denoising_losses(pipeline: Pipeline):
    """``losses(params, ids [B, L], z0 [B, ...], t [B], noise [B, ...]) -> [B]``: each example's denoising MSE."""
    schedule = Schedule.from_config(pipeline.scheduler_config)
    unet, text = pipeline.unet, pipeline.text_encoder

    def losses(params, ids, z0, t, noise):
        states = text.apply({"params": params["text_encoder"]}, ids).last_hidden_state
        pred = unet.apply({"params": params["unet"]}, add_noise(schedule, z0, noise, t), t, states)
        err = jnp.square(pred.astype(jnp.float32) - target(schedule, z0, noise, t))
        return err.reshape(err.shape[0], -1).mean(axis=1)

    return losses


def _draws(key: jax.Array, pipeline: Pipeline, z0: np.ndarray) -> tuple[jax.Array, jax.Array]:
    schedule = Schedule.from_config(pipeline.scheduler_config)
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (z0.shape[0],), 0, schedule.num_train_timesteps)
    return t, jax.random.normal(k_n, z0.shape, jnp.float32)


@functools.lru_cache(maxsize=4)
def _inversion_step(pipeline: Pipeline, selection: params_lib.Selection, learning_rate: float):
    """``(tx, step)``: one Adam step on the selected embedding row against the model given as an argument,
    compiled once for every model attacked."""
    losses = _denoising_losses(pipeline)
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(trainable, opt_state, params, ids, z0, key):
        t, noise = _draws(key, pipeline, z0)

        def loss(tr):
            return losses(selection.merge(params, tr), ids, z0, t, noise).mean()

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return tx, step


def embedding_attack(spec: config_lib.Spec, pipeline: Pipeline, params: Mapping[str, Any],
                     images: TargetImages) -> Attack:
    """Textual inversion against ``params``: one token's embedding learned on ``images``; see the module doc."""
    config, concept = spec.config, spec.concept
    a = config.attack
    tok = pipeline.tokenizer
    word = _word(concept)
    avoid = [*concept.anchor_prompts, *(p for s in concept.eval_sets for p in s.prompts), *images.prompts]
    candidates = text_to_image.vocabulary_words(tok, avoid)
    if not candidates:
        raise AttackError("the tokenizer has no whole-word token that the concept's prompts leave unused")
    placeholder = candidates[-1]
    (token,) = _ids(tok, placeholder)
    selection = params_lib.selection(params, "embedding", [token])
    # Start from the anchor's embedding (its first token's row, under the same flat key as the
    # token's): what the token learns is the attack's work, not the target word's.
    trainable = params_lib.selection(params, "embedding", _ids(tok, concept.anchor)[:1]).split(params)
    fit_prompts = [concepts.replace_word(p, word, placeholder) for p in images.prompts]
    ids = jnp.asarray(text_to_image.tokenize(pipeline, fit_prompts))
    tx, step = _inversion_step(pipeline, selection, float(a.embedding_learning_rate))
    opt_state = tx.init(trainable)
    root = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), ATTACK_STREAM), 1)
    value = jnp.nan
    for i in range(int(a.embedding_steps)):
        trainable, opt_state, value = step(trainable, opt_state, params, ids, images.latents,
                                           jax.random.fold_in(root, i))
    attacked = selection.merge(params, trainable)
    prompts = tuple(concepts.replace_word(p, word, placeholder) for p in _target_set(concept).prompts)
    return Attack("embedding", "embedding", prompts, attacked,
                  detail=f"token '{placeholder}', final loss {float(value):.4f}")


def search_attack(spec: config_lib.Spec, pipeline: Pipeline, params: Mapping[str, Any],
                  images: TargetImages) -> Attack:
    """A prefix of vocabulary words chosen by the denoising loss towards ``images``; see the module doc."""
    config, concept = spec.config, spec.concept
    a = config.attack
    n_tokens, n_candidates = int(a.search_tokens), int(a.search_candidates)
    words = text_to_image.vocabulary_words(pipeline.tokenizer)
    if not words:
        raise AttackError("the tokenizer has no whole-word tokens to search over")
    rng = np.random.default_rng(config.seed)
    prefix = [words[int(i)] for i in rng.integers(len(words), size=n_tokens)]
    losses = jax.jit(_denoising_losses(pipeline))
    z0 = images.latents
    b = z0.shape[0]
    root = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), ATTACK_STREAM), 2)

    def score(prefixes: list[list[str]], key: jax.Array) -> np.ndarray:
        """Mean loss of each candidate prefix on every image, the same noise for all candidates."""
        t, noise = _draws(key, pipeline, z0)
        prompts = [" ".join(p) + " " + q for p in prefixes for q in images.prompts]
        ids = jnp.asarray(text_to_image.tokenize(pipeline, prompts))
        k = len(prefixes)
        out = losses(params, ids, jnp.tile(z0, (k, 1, 1, 1)), jnp.tile(t, k), jnp.tile(noise, (k, 1, 1, 1)))
        return np.asarray(out).reshape(k, b).mean(axis=1)

    best = float("nan")
    for i in range(int(a.search_steps)):
        slot = i % n_tokens
        options = [prefix[slot], *(words[int(j)] for j in rng.integers(len(words), size=n_candidates))]
        candidates = [prefix[:slot] + [w] + prefix[slot + 1:] for w in options]
        values = score(candidates, jax.random.fold_in(root, i))
        prefix = candidates[int(np.argmin(values))]
        best = float(np.min(values))
    text = " ".join(prefix)
    prompts = tuple(f"{text} {p}" for p in _target_set(concept).prompts)
    return Attack("search", "search", prompts, detail=f"prefix '{text}', loss {best:.4f}")


def without_target(search: Attack, concept: concepts.Concept) -> Attack:
    """The control of ``search``: its prompts with every name of the target replaced by the anchor."""
    names = sorted(concept.names, key=len, reverse=True)  # "circle with a happy face" before "happy face"
    prompts = []
    for p in search.prompts:
        for name in names:
            p = concepts.replace_word(p, name, concept.anchor)
        prompts.append(p)
    return Attack("search_without_target", "control", tuple(prompts), detail=search.detail)


def search_controls(searches: Mapping[str, Attack], concept: concepts.Concept) -> dict[str, Attack]:
    """``{model: control}``: the ablated model's search (the base model's when alone) without the target's
    name, the same prompts for every model, so that the models are compared on one prompt."""
    control = without_target(searches.get("ablated", searches["base"]), concept)
    return {m: control for m in searches}


# ------------------------------------------------------------------------------------------------ all of them


def build(spec: config_lib.Spec, kinds: Sequence[str], pipeline: Pipeline, models: Mapping[str, Mapping[str, Any]],
          mesh: jax.sharding.Mesh) -> dict[str, dict[str, Attack]]:
    """``{attack name: {model: Attack}}`` for ``kinds``, every model attacked with the same settings."""
    concept = spec.concept
    out: dict[str, dict[str, Attack]] = {}
    fixed: list[Attack] = []
    if "misspelling" in kinds:
        fixed += misspelling_attacks(concept, pipeline.tokenizer)
    if "paraphrase" in kinds:
        fixed += paraphrase_attacks(concept)
    for attack in fixed:
        out[attack.name] = {m: attack for m in models}
    learned = [k for k in ("embedding", "search") if k in kinds]
    if learned:
        images = target_images(spec, pipeline, mesh)
        for kind in learned:
            fn = embedding_attack if kind == "embedding" else search_attack
            out[kind] = {}
            for m, params in models.items():
                attack = fn(spec, pipeline, params, images)
                log.info("attack %s against the %s model: %s", kind, m, attack.detail)
                out[kind][m] = attack
        if "search" in out:
            out["search_without_target"] = search_controls(out["search"], concept)
    return out
