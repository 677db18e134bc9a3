"""Concept ablation, end to end: anchors -> train -> evaluate -> export.

    python -m ablate_jax.train --config=configs/xattn.py [--config.train.steps=100] [--workdir=DIR]

Each stage is skipped when the workdir already holds its result (finished anchors, a
checkpoint at the last step), so an interrupted run resumes where it stopped. The train step is
one jit-compiled program over a device mesh: the train state (trainable leaves and their
optimizer state) is donated; the frozen pretrained parameters, which are also the teacher, are
a separate argument that is never donated nor copied.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from ablate_jax import (
    anchor_store,
    checkpointing,
    concepts,
    distributed,
    losses,
    preflight,
    sharding,
    storage,
    text_to_image,
)
from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax.concepts import Concept, ConceptError
from ablate_jax.data import AnchorBatches
from ablate_jax.models.loading import ModelLoadError, Pipeline, load_pipeline
from ablate_jax.schedule import Schedule, add_noise, target
from ablate_jax.workdir import Workdir, WorkdirError

log = logging.getLogger("ablate_jax")

class TrainError(RuntimeError):
    """Training cannot go on; the message says why."""


# ------------------------------------------------------------------------------------------------ step


@dataclasses.dataclass(frozen=True)
class Adversary:
    """The inner loop of robust ablation (docs/attacks.md): the embedding rows it perturbs (the target
    words' tokens), the bound of each row's perturbation relative to the row's norm, and its steps."""

    rows: tuple[int, ...]
    epsilon: float
    steps: int


def adversary_for(config: ml_collections.ConfigDict, pipeline: Pipeline,
                  concept: Concept | Sequence[Concept]) -> Adversary | None:
    """The run's adversary (over the target tokens of every concept), or None when ``robust.adversarial`` is off."""
    r = config.robust
    if not r.adversarial:
        return None
    rows = params_lib.target_token_ids_of(pipeline.tokenizer, concept)
    if not rows:
        names = ", ".join(c.target for c in ((concept,) if isinstance(concept, Concept) else concept))
        raise TrainError(f"robust.adversarial: the target {names!r} has no token of its own to perturb")
    return Adversary(tuple(rows), float(r.epsilon), int(r.steps))


def make_objective(pipeline: Pipeline, selection: params_lib.Selection, loss_cfg: losses.LossConfig, *,
                   stop_sot_kv_grad: bool = True, remat: str = "none", encode_chunks: int = 1,
                   adversary: Adversary | None = None):
    """``objective(trainable, base, batch, key, weights=None) -> (loss, terms)``: the loss of one batch, a pure
    function (``weights``: see :func:`ablate_jax.losses.ablation_loss`).

    ``batch``: ``image`` [B, H, W, 3] in [-1, 1], ``mask`` [B, h, w, 1], ``target_ids``,
    ``anchor_ids`` and (preservation) ``keep_ids`` [B, L]. ``key`` draws the VAE posterior
    sample, the timesteps and the noise. The frozen teacher is ``base`` itself. The VAE encodes
    the images in ``encode_chunks`` sequential calls, each taking rows ``j, j + k, j + 2k, ...``
    (``k`` chunks): with the batch split over devices in contiguous blocks, every call then
    takes the same number of rows from every device, and no row moves between devices.

    With an ``adversary`` (and ``loss_cfg.adversarial_weight``), projected gradient ascent on the
    embeddings of the target's tokens finds, under the current parameters held fixed, the
    perturbation of the target prompt that most increases the ablation term; the student under
    that perturbed prompt is then trained towards the same target as under the plain one.
    """
    schedule = Schedule.from_config(pipeline.scheduler_config)
    perturbed = params_lib.selection(pipeline.params, "embedding", adversary.rows) if adversary else None
    unet = pipeline.unet.clone(stop_sot_kv_grad=stop_sot_kv_grad, remat=remat)
    vae, text = pipeline.vae, pipeline.text_encoder
    scale = pipeline.vae_scaling_factor

    def encode_text(te_params, ids):
        return text.apply({"params": te_params}, ids).last_hidden_state

    def encode(vae_params, images):
        if encode_chunks <= 1:
            return vae.apply({"params": vae_params}, images, method=vae.encode)
        b = images.shape[0]
        chunks = images.reshape(b // encode_chunks, encode_chunks, *images.shape[1:]).swapaxes(0, 1)
        mean, logvar = jax.lax.map(lambda x: vae.apply({"params": vae_params}, x, method=vae.encode), chunks)
        unchunk = lambda y: y.swapaxes(0, 1).reshape(b, *y.shape[2:])  # noqa: E731
        return unchunk(mean), unchunk(logvar)

    def objective(trainable, base, batch, key, weights=None):
        k_post, k_t, k_noise = jax.random.split(key, 3)
        mean, logvar = encode(base["vae"], batch["image"])
        z0 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_post, mean.shape, mean.dtype)).astype(jnp.float32)
        z0 = jax.lax.stop_gradient(z0 * scale)
        b = z0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, z0.shape, jnp.float32)
        x_t = add_noise(schedule, z0, noise, t)
        regress = target(schedule, z0, noise, t)
        mask = batch["mask"]

        prompt_ids = {"target": batch["target_ids"], "anchor": batch["anchor_ids"]}
        if "keep_ids" in batch:
            prompt_ids["keep"] = batch["keep_ids"]
        names = list(prompt_ids)
        all_ids = jnp.concatenate([prompt_ids[n] for n in names])
        base_states = jax.lax.stop_gradient(encode_text(base["text_encoder"], all_ids))
        base_states = dict(zip(names, jnp.split(base_states, len(names)), strict=True))

        student_params = selection.merge(base, trainable)
        if selection.trains_text_encoder:
            states = encode_text(student_params["text_encoder"], all_ids)
            student_states = dict(zip(names, jnp.split(states, len(names)), strict=True))
        else:
            student_states = base_states
        contexts = {
            "student_target": student_states["target"],
            "student_anchor": student_states["anchor"],
            "anchor": base_states["anchor"],
        }
        if "keep" in names:
            contexts["student_keep"] = student_states["keep"]
            contexts["keep"] = base_states["keep"]

        def student(x, tt, ctx):
            return unet.apply({"params": student_params["unet"]}, x, tt, ctx).astype(jnp.float32)

        def teacher(x, tt, ctx):
            return unet.apply({"params": base["unet"]}, x, tt, ctx).astype(jnp.float32)

        teacher_anchor = None
        if adversary is not None and loss_cfg.adversarial_weight > 0:
            goal = regress
            if loss_cfg.loss == "model_based":
                goal = jax.lax.stop_gradient(teacher(x_t, t, base_states["anchor"]))
                # The frozen teacher's anchor pass, already made, serves the loss as well.
                teacher_anchor = goal if loss_cfg.teacher == "frozen" else None
            contexts["student_adversarial"] = adversarial_states(
                student_params, batch["target_ids"], x_t, t, goal, mask, jax.random.fold_in(key, 1))
        return losses.ablation_loss(student, teacher, x_t, t, contexts, regress, mask, loss_cfg, teacher_anchor, weights,
                                    batch.get("keep_weight"))

    def adversarial_states(params, ids, x_t, t, goal, mask, key):
        """The target prompt's states with its tokens' embeddings moved (within the bound) to undo the ablation."""
        assert perturbed is not None and adversary is not None
        ((name, rows),) = perturbed.split(params).items()
        rows = rows.astype(jnp.float32)
        radius = adversary.epsilon * jnp.linalg.norm(rows, axis=-1, keepdims=True)
        fixed = jax.lax.stop_gradient(params)

        def project(delta):
            norm = jnp.linalg.norm(delta, axis=-1, keepdims=True)
            return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))

        def strayed(delta):
            p = perturbed.merge(fixed, {name: jax.lax.stop_gradient(rows) + delta})
            pred = unet.apply({"params": p["unet"]}, x_t, t, encode_text(p["text_encoder"], ids))
            return losses.masked_mse(pred.astype(jnp.float32), goal, mask)

        delta = project(jax.random.normal(key, rows.shape, jnp.float32) * radius / jnp.sqrt(rows.shape[-1]))
        for _ in range(adversary.steps):  # a few steps, unrolled
            g = jax.grad(strayed)(delta)
            g = g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
            delta = project(delta + 2.5 * radius / adversary.steps * g)
        delta = jax.lax.stop_gradient(delta)
        # The trained parameters enter here (not the fixed copy), so the outer step learns to undo the perturbation.
        p = perturbed.merge(params, {name: rows + delta})
        return encode_text(p["text_encoder"], ids)

    return objective


def encode_chunks_for(requested: int, rows_per_device: int) -> int:
    """The chunk count :func:`make_objective` can use: at most ``requested``, splitting every device's
    rows evenly (each chunk takes the same number of rows from every device)."""
    return math.gcd(requested, rows_per_device)


def update(objective: Callable[..., Any], tx: optax.GradientTransformation, state: dict[str, Any], base: Any, batch: dict[str, Any],
           key: jax.Array, weights: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One optimizer step of ``objective`` (see :func:`make_objective`) from ``state``, with the step's
    draws from ``key``: ``(new state, metrics)``. A run's step and a sweep's (vmapped) both take it."""
    (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(state["params"], base, batch, key, weights)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
    }
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "nonfinite": opt_state.total_notfinite, **{f"loss_{k}": v for k, v in terms.items()}}
    return new_state, metrics


def probe_value(objective: Callable[..., Any], trainable: dict[str, Any], base: Any, batch: dict[str, Any], key: jax.Array,
                weights: dict[str, Any] | None = None) -> tuple[jax.Array, jax.Array]:
    """``(loss, all parameters finite)``: what :func:`divergence` judges before a checkpoint is saved."""
    loss, _ = objective(trainable, base, batch, key, weights)
    return loss, jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(trainable)]))


def divergence(loss: float, finite: bool, reference: float, factor: float) -> str | None:
    """Why the parameters about to be saved must not be (probe ``loss`` against its ``reference`` before
    training, at most ``factor`` times it), or None when they may."""
    if not finite:
        return "the parameters became NaN or infinite"
    if not np.isfinite(loss):
        return "the loss with the new parameters is NaN or infinite"
    if loss > factor * max(reference, 1e-12):
        return f"the loss with the new parameters is {loss:.3g}, over {factor:g} times its {reference:.3g} before training"
    return None


_STOPPED = "stopped without saving (last good checkpoint: {}). Lower train.learning_rate or check the anchor images."


def diverged_message(step: int, why: str, last_good: str) -> str:
    """Why a run stopped at a save: :func:`divergence`'s reason and the last checkpoint it left."""
    return f"training diverged by step {step}: {why}; " + _STOPPED.format(last_good)


def nonfinite_message(step: int, last_good: str) -> str:
    """Why a run stopped when a step's loss or update was not finite."""
    return f"the loss became NaN or infinite by step {step}; " + _STOPPED.format(last_good)


def nonfinite(loss: float, skipped_updates: int) -> bool:
    """A step's metrics show a NaN or infinite loss, or an update that ``apply_if_finite`` skipped."""
    return int(skipped_updates) > 0 or not np.isfinite(float(loss))


def make_train_step(pipeline: Pipeline, selection: params_lib.Selection, loss_cfg: losses.LossConfig,
                    tx: optax.GradientTransformation, *, seed: int, stop_sot_kv_grad: bool = True,
                    remat: str = "none", encode_chunks: int = 1, adversary: Adversary | None = None):
    """``step(state, base, batch) -> (state, metrics)``, a pure function ready to jit.

    Randomness (VAE posterior sample, timesteps, noise) comes from ``fold_in(seed, step)``, drawn
    for the whole global batch, so a resumed run draws exactly what an uninterrupted one would.
    """
    objective = make_objective(pipeline, selection, loss_cfg, stop_sot_kv_grad=stop_sot_kv_grad, remat=remat,
                               encode_chunks=encode_chunks, adversary=adversary)
    root = jax.random.key(seed)

    def step(state, base, batch):
        return update(objective, tx, state, base, batch, jax.random.fold_in(root, state["step"]))

    return step


# The probe batch's randomness: a stream of its own, never one of the train steps'.
PROBE_STREAM = 0x70726F62  # "prob" in ASCII


@functools.lru_cache(maxsize=8)
def compiled_probe(pipeline: Pipeline, selection: params_lib.Selection, loss_cfg: losses.LossConfig, seed: int,
                   stop_sot_kv_grad: bool, remat: str, mesh: jax.sharding.Mesh, encode_chunks: int = 1,
                   adversary: Adversary | None = None):
    """``probe(trainable, base, batch) -> (loss, all_finite)``: the objective of fixed draws, jitted.

    Measured on the parameters about to be saved, it is what stands between a diverging update
    and a checkpoint (see :func:`train`).
    """
    objective = make_objective(pipeline, selection, loss_cfg, stop_sot_kv_grad=stop_sot_kv_grad, remat=remat,
                               encode_chunks=encode_chunks, adversary=adversary)
    key = jax.random.fold_in(jax.random.key(seed), PROBE_STREAM)

    def probe(trainable, base, batch):
        return probe_value(objective, trainable, base, batch, key)

    return jax.jit(probe, out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=8)
def compiled_train_step(pipeline: Pipeline, selection: params_lib.Selection, loss_cfg: losses.LossConfig,
                        clip_norm: float, seed: int, stop_sot_kv_grad: bool, mesh: jax.sharding.Mesh,
                        remat: str = "none", encode_chunks: int = 1, adversary: Adversary | None = None):
    """The jitted train step, shared by runs in one process that use the same pipeline object and settings.

    The learning rate and weight decay are read from the train state (``params.optimizer``), so
    runs that differ only in them share this step. The state is donated; the frozen base
    parameters are not (every step reads them).
    """
    # Rate and decay here are placeholders: the step uses the values ``init`` put in the state.
    tx = params_lib.optimizer(1.0, weight_decay=0.0, clip_norm=clip_norm)
    state_sharding, base_sharding = state_shardings(pipeline, selection, tx, mesh)
    return jax.jit(
        make_train_step(pipeline, selection, loss_cfg, tx, seed=seed, stop_sot_kv_grad=stop_sot_kv_grad, remat=remat,
                        encode_chunks=encode_chunks, adversary=adversary),
        in_shardings=(state_sharding, base_sharding, sharding.batch_sharded(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def state_shardings(pipeline: Pipeline, selection: params_lib.Selection, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """Layouts of the train state and of the frozen base: replicated, or split on the ``fsdp`` axis."""
    abstract = jax.eval_shape(lambda p: checkpointing.initial_state(selection.split(p), tx), pipeline.params)
    return sharding.tree_shardings(mesh, abstract), sharding.tree_shardings(mesh, pipeline.params)


# ------------------------------------------------------------------------------------------------ stages


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares: its guarded workdir (which holds the spec), the loaded
    base model, the mesh and the parameter selection, each made once by :func:`run`."""

    workdir: Workdir
    pipeline: Pipeline
    mesh: jax.sharding.Mesh
    selection: params_lib.Selection

    @property
    def spec(self) -> config_lib.Spec:
        return self.workdir.spec


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
    return config_lib.loss_config(config)


def anchor_batches(workdir: Workdir, pipeline: Pipeline, *, source: anchor_store.AnchorSource | None = None,
                   process_index: int = 0, process_count: int = 1) -> AnchorBatches:
    """The run's training batches from its anchor set (``source``, when already open), as its config
    says; this process's share of each global batch (the whole batch with the defaults)."""
    spec, config = workdir.spec, workdir.spec.config
    t = config.train
    if spec.several:
        # One source per concept; ``source``, when given, is their tuple.
        source = source if source is not None else tuple(anchor_store.open_anchors(p) for p in workdir.parts)
    elif source is None:
        source = anchor_store.open_anchors(workdir)
    data = AnchorBatches(
        source, spec.concepts if spec.several else spec.concept,
        lambda p: text_to_image.tokenize(pipeline, p), seed=config.seed, global_batch=t.batch_size,
        latent_factor=pipeline.vae_downsample, flip=t.flip, rescale=t.rescale,
        with_keep=config_lib.loss_config(config).needs_keep, misspell=float(config.robust.misspell),
        paraphrase=float(config.robust.paraphrase), context=float(config.robust.context),
        vocabulary=text_to_image.vocabulary_words(pipeline.tokenizer) if config.robust.context else (),
        process_index=process_index, process_count=process_count,
    )
    if spec.several and any(data.left_out.values()):
        log.info("left out of training, as their prompts name another concept's target or its alias: %s",
                 ", ".join(f"{n} of the {label} anchors" for label, n in zip(spec.labels, data.left_out.values(),
                                                                           strict=True) if n))
    return data


def metric_writer(workdir: Workdir) -> Any:
    """The run's metric writer: ``WORKDIR/logs`` (TensorBoard, unless ``train.tensorboard`` is off) and the
    log, on process 0; the log alone elsewhere."""
    from clu import metric_writers  # noqa: PLC0415  (imports TensorFlow; only training needs it)

    return metric_writers.create_default_writer(
        os.fspath(workdir.path / "logs"),
        just_logging=jax.process_index() > 0 or not workdir.spec.config.train.tensorboard)


def train(ctx: RunContext, *, progress: bool = True) -> dict[str, Any]:
    """Trains to ``train.steps`` (resuming from the latest checkpoint) and returns a summary.

    Before each checkpoint the objective is measured on a fixed probe batch with the very
    parameters being saved; a non-finite value, non-finite parameters, or a probe loss above
    ``train.divergence_factor`` times its value before training stop the run without saving, so
    every checkpoint on disk holds finite parameters that have not run away.
    """
    config = ctx.spec.config
    pipeline, mesh, selection = ctx.pipeline, ctx.mesh, ctx.selection
    n_dev = mesh.devices.size
    if config.train.batch_size % n_dev:
        raise TrainError(f"train.batch_size {config.train.batch_size} is not a multiple of the {n_dev} devices")
    if distributed.is_primary():
        ctx.workdir.record_checkpoints()
    tx = checkpointing.optimizer_for(config)
    loss_cfg = loss_config(config)
    t = config.train

    batch_sharding = sharding.batch_sharded(mesh)
    state_sharding, base_sharding = state_shardings(pipeline, selection, tx, mesh)
    base = sharding.put(params_lib.frozen_for_compute(pipeline.params, config.dtype), base_sharding)
    chunks = encode_chunks_for(t.encode_chunks, t.batch_size // n_dev)
    # The state is donated to every step, so it must not share buffers with the base (on one
    # device, putting an array where it already is returns the same buffer).
    initial = selection.split(pipeline.params)
    state = sharding.put(checkpointing.initial_state(jax.tree.map(jnp.copy, initial), tx), state_sharding)
    mngr = checkpointing.manager(ctx.workdir.path)
    start = 0
    if mngr.latest_step() is not None:
        state, position = checkpointing.restore(mngr, checkpointing.abstract_state(state, state_sharding))
        start = int(position["step"])
        log.info("resumed from the checkpoint at step %d", start)
    steps = t.steps
    if start >= steps:
        log.info("training already reached step %d of %d; nothing to do", start, steps)
        return {"steps": start, "seconds": 0.0, "skipped": True, "trainable": selection.count(pipeline.params)}

    data = anchor_batches(ctx.workdir, pipeline, process_index=jax.process_index(),
                          process_count=jax.process_count())
    adversary = adversary_for(config, pipeline, ctx.spec.concepts)
    step_fn = compiled_train_step(pipeline, selection, loss_cfg, t.clip_norm, config.seed, config.stop_sot_kv_grad,
                                  mesh, t.remat, chunks, adversary)
    probe_fn = compiled_probe(pipeline, selection, loss_cfg, config.seed, config.stop_sot_kv_grad, t.remat, mesh,
                              chunks, adversary)
    writer = metric_writer(ctx.workdir)
    log.info("training %s (%s scalars) for %d steps, global batch %d on %d devices%s",
             config.params, f"{selection.count(pipeline.params):,}", steps, t.batch_size, n_dev,
             f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
    if sharding.fsdp_size(mesh) > 1:
        log.info("fsdp: parameters and optimizer state split over %d devices", sharding.fsdp_size(mesh))

    def device_batch(step: int) -> dict[str, jax.Array]:
        local = data.batch(step)
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

    def last_good() -> str:
        mngr.wait_until_finished()  # the last save may still be writing; it is whole before the run stops
        last = mngr.latest_step()
        return f"step {last}" if last is not None else "none"

    # The probe: the first batch with draws of its own, measured before training (from the
    # pretrained parameters, so a resumed run measures the same reference) and before each save.
    probe_batch = device_batch(0)
    reference, _ = probe_fn(sharding.put(initial, state_sharding["params"]), base, probe_batch)
    reference = float(sharding.to_host(reference))

    probe_losses: dict[int, float] = {}

    def check_saved(step: int) -> None:
        loss, finite = (sharding.to_host(v) for v in probe_fn(state["params"], base, probe_batch))
        loss = probe_losses[step] = float(loss)
        why = divergence(loss, bool(finite), reference, t.divergence_factor)
        if why:
            raise TrainError(diverged_message(step, why, last_good()))

    def check_metrics(metrics: dict[str, Any], step: int) -> None:
        if nonfinite(metrics["loss"], metrics["nonfinite"]):
            raise TrainError(nonfinite_message(step, last_good()))

    t0 = time.perf_counter()
    window_t, window_steps = time.perf_counter(), 0
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not progress or not distributed.is_primary())
    metrics = None
    for step in range(start, steps):
        state, metrics = step_fn(state, base, device_batch(step))
        done = step + 1
        window_steps += 1
        bar.update(1)
        log_now = done % t.log_every == 0 or done == steps
        save_now = done % t.checkpoint_every == 0 or done == steps
        if log_now or save_now:
            m = jax.tree.map(sharding.to_host, metrics)
            check_metrics(m, done)
        if log_now:
            now = time.perf_counter()
            scalars = {k: float(v) for k, v in m.items() if k != "nonfinite"}
            scalars |= {"learning_rate": t.learning_rate, "steps_per_sec": window_steps / (now - window_t)}
            writer.write_scalars(done, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}")
            window_t, window_steps = now, 0
        if save_now:
            check_saved(done)
            checkpointing.save(mngr, done, state, {"step": done, "examples_seen": done * t.batch_size})
    bar.close()
    mngr.wait_until_finished()
    writer.flush()
    seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": seconds, "skipped": False, "trainable": selection.count(pipeline.params),
            "final_loss": float(sharding.to_host(metrics["loss"])) if metrics is not None else None,
            "probe_loss": {"before": reference, **probe_losses}}


def run(config: ml_collections.ConfigDict | config_lib.Spec, workdir: str | os.PathLike, *,
        pipeline: Pipeline | None = None, progress: bool = True) -> dict[str, Any]:
    """The whole job; returns the evaluation report (or a summary when evaluation is off).

    The run is prepared once (:func:`ablate_jax.config.prepare`: model family, concept, resolved
    values) and every check of every stage runs (:func:`ablate_jax.preflight.check_run`, the
    workdir guard included) before the first stage starts; the resolved values are logged and
    written to ``WORKDIR/config.json``. The stages then share that spec, the guarded workdir, the
    parameter selection and one restore of the trained parameters (docs/design.md, "Stages hand
    their results forward"). ``pipeline``: the model ``config.model`` names, already loaded (with
    ``config.dtype``). Runs that share one pipeline object in a process also share its compiled programs.
    """
    from ablate_jax import anchors  # noqa: PLC0415

    spec = config_lib.prepare(config)
    config = spec.config
    wd = preflight.check_run(spec, workdir, model_loaded=pipeline is not None)
    log.info("model %s (%s), params %s, loss %s, teacher %s", config.model, spec.family.title, config.params,
             config.loss, config.teacher)
    for line in spec.notes.lines():
        log.info("resolved: %s", line)
    if pipeline is None:
        pipeline = load_pipeline(spec.model_path, dtype=jnp.dtype(config.dtype))
    mesh = make_mesh(config)
    if distributed.is_primary():
        preflight.write_resolved(spec, wd.path)
    ctx = RunContext(wd, pipeline, mesh, checkpointing.selection_for(config, pipeline, spec.concepts))
    timing: dict[str, float] = {}

    t = time.perf_counter()
    anchor_summary = anchors.generate_anchors(spec, wd, pipeline=pipeline, mesh=mesh, progress=progress)
    timing["anchors"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = train(ctx, progress=progress)
    timing["train"] = time.perf_counter() - t

    report = evaluate_and_export(ctx, timing, progress=progress)
    report["anchors"], report["train"] = anchor_summary, summary
    return report


def evaluate_and_export(ctx: RunContext, timing: dict[str, float], *, progress: bool = True,
                        base_images: dict[Any, np.ndarray] | None = None) -> dict[str, Any]:
    """The stages after training, each when enabled: one restore of the trained parameters, the
    evaluation report and the export; ``timing`` (the earlier stages' seconds) goes into the report.
    ``base_images``: see :func:`ablate_jax.evaluate.evaluate_run`."""
    from ablate_jax import evaluate  # noqa: PLC0415

    config, wd, pipeline = ctx.spec.config, ctx.workdir, ctx.pipeline
    report: dict[str, Any] = {}
    timing = dict(timing)
    ablated = None
    if config.eval.enabled or config.export.enabled:
        ablated = checkpointing.restore_ablated_params(wd, pipeline, ctx.selection)
    if config.eval.enabled:
        t = time.perf_counter()
        report = evaluate.evaluate_run(ctx.spec, wd.path, ablated_params=ablated, pipeline=pipeline, mesh=ctx.mesh,
                                       progress=progress, base_images=base_images)
        timing["eval"] = time.perf_counter() - t
    if config.export.enabled:
        from ablate_jax import export  # noqa: PLC0415

        t = time.perf_counter()
        report["export"] = str(export.export_run(ctx.spec, wd, pipeline=pipeline, ablated_params=ablated,
                                                 selection=ctx.selection))
        timing["export"] = time.perf_counter() - t
    report["timing_s"] = {**report.get("timing_s", {}), **timing}
    if config.eval.enabled and jax.process_index() == 0:
        evaluate.write_report(report, wd.path / "eval")  # again, now with every stage's time
    return report


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's mesh over every device of every process."""
    n, fsdp = jax.device_count(), config.mesh.fsdp
    if n % fsdp:
        raise TrainError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
    return sharding.make_mesh(fsdp=fsdp)


# ------------------------------------------------------------------------------------------------ CLI

_ERRORS = (TrainError, distributed.DistributedError, ConceptError, config_lib.ConfigError, ModelLoadError, WorkdirError,
           checkpointing.CheckpointError, params_lib.ParamsError, preflight.PreflightError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    """``python -m ablate_jax.train --config=FILE[:key=value,...] [--workdir=DIR] [--config.KEY=VALUE ...]``.

    Returns the exit status: 0, or 1 after printing one ``error:`` line.
    """
    from absl import flags  # noqa: PLC0415

    from ablate_jax import cli, evaluate  # noqa: PLC0415

    argv = list(sys.argv if argv is None else argv)
    fv = cli.flag_values(argv, "run directory (default: workdirs/<concept>-<params>-<time>)")
    flags.DEFINE_bool("progress", True, "show progress bars (off under CI without a terminal)", flag_values=fv)
    if cli.help_requested(argv, fv, __doc__.splitlines()[0], "python -m ablate_jax.train "
                          "--config=FILE[:key=value,...] [--workdir=DIR] [--config.KEY=VALUE ...]"):
        return 0
    cli.configure_logging(level=logging.INFO)
    for name in ("fsspec", "gcsfs"):  # a line per file opened on a bucket
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        config, workdir = cli.parse(fv, argv, TrainError, workdir_required=False)
        if jax.process_count() > 1 and not workdir:
            # Each process would stamp its own time into the default name.
            raise TrainError("a multi-process run needs --workdir (a folder every process can reach)")
        workdir = workdir or str(Path("workdirs") / default_run_name(config))
        progress = fv.progress and (sys.stderr.isatty() or not os.environ.get("CI"))
        report = run(config, workdir, progress=progress)
    except _ERRORS as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    if not distributed.is_primary():
        return 0
    if "sets" in report:
        print(evaluate.format_table(report))
    print(json.dumps(report.get("timing_s", {}), indent=None))
    print(f"workdir: {storage.path(workdir)}")
    return 0


# A default workdir name keeps these characters of the concept's name, and at most this many.
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_NAME_MAX = 48


def default_run_name(config: ml_collections.ConfigDict) -> str:
    """``CONCEPT-PARAMS-TIME``: a single folder name, whatever the target says ("../../x" or 500 words)."""
    if config.concepts:
        raw = "+".join(e if not e.strip().startswith("{") else "concept" for e in config.concepts)
    else:
        raw = config.concept.preset or concepts.parse_targets(config.concept.target or "run")[0]
    name = _NAME_CHARS.sub("_", raw.replace(" ", "_")).strip("_-.")[:_NAME_MAX].strip("_-") or "run"
    params = _NAME_CHARS.sub("_", str(config.params))[:16] or "params"
    return f"{name}-{params}-{time.strftime('%Y%m%d-%H%M%S')}"


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
