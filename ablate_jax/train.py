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
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from ablate_jax import checkpointing, distributed, losses, sampling, sharding, storage
from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax.concepts import Concept, ConceptError, EvalSet, misspell, replace_word
from ablate_jax.data import AnchorBatches
from ablate_jax.models.loading import ModelLoadError, Pipeline, load_pipeline
from ablate_jax.schedule import Schedule, add_noise, target

log = logging.getLogger("ablate_jax")

# For tests only: seconds to sleep after each train step, so a test can kill a run part-way.
STEP_DELAY_ENV = "ABLATE_JAX_TEST_STEP_DELAY"


class TrainError(RuntimeError):
    """Training cannot go on; the message says why."""


# ------------------------------------------------------------------------------------------------ step


def make_train_step(pipeline: Pipeline, selection: params_lib.Selection, loss_cfg: losses.LossConfig,
                    tx: optax.GradientTransformation, *, seed: int, stop_sot_kv_grad: bool = True):
    """``step(state, base, batch) -> (state, metrics)``, a pure function ready to jit.

    ``batch``: ``image`` [B, H, W, 3] in [-1, 1], ``mask`` [B, h, w, 1], ``target_ids``,
    ``anchor_ids`` and (preservation) ``keep_ids`` [B, L]. Randomness (VAE posterior sample,
    timesteps, noise) comes from ``fold_in(seed, step)`` and is split per example by its row, so
    a resumed run draws exactly what an uninterrupted one would.
    """
    schedule = Schedule.from_config(pipeline.scheduler_config)
    unet = pipeline.unet.clone(stop_sot_kv_grad=stop_sot_kv_grad)
    vae, text = pipeline.vae, pipeline.text_encoder
    scale = pipeline.vae_scaling_factor
    root = jax.random.key(seed)

    def encode_text(te_params, ids):
        return text.apply({"params": te_params}, ids).last_hidden_state

    def step(state, base, batch):
        key = jax.random.fold_in(root, state["step"])
        k_post, k_t, k_noise = jax.random.split(key, 3)
        mean, logvar = vae.apply({"params": base["vae"]}, batch["image"], method=vae.encode)
        z0 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_post, mean.shape, mean.dtype)).astype(jnp.float32)
        z0 = z0 * scale
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
        base_states = dict(zip(names, jnp.split(encode_text(base["text_encoder"], all_ids), len(names)), strict=True))

        def loss_fn(trainable):
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

            return losses.ablation_loss(student, teacher, x_t, t, contexts, regress, mask, loss_cfg)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "nonfinite": opt_state.total_notfinite, **{f"loss_{k}": v for k, v in terms.items()}}
        return new_state, metrics

    return step


@functools.lru_cache(maxsize=8)
def compiled_train_step(pipeline: Pipeline, selection: params_lib.Selection, loss_cfg: losses.LossConfig,
                        clip_norm: float, seed: int, stop_sot_kv_grad: bool, mesh: jax.sharding.Mesh):
    """The jitted train step, shared by runs in one process that use the same pipeline object and settings.

    The learning rate and weight decay are read from the train state (``params.optimizer``), so
    runs that differ only in them share this step. The state is donated; the frozen base
    parameters are not (every step reads them).
    """
    # Rate and decay here are placeholders: the step uses the values ``init`` put in the state.
    tx = params_lib.optimizer(1.0, weight_decay=0.0, clip_norm=clip_norm)
    state_sharding, base_sharding = state_shardings(pipeline, selection, tx, mesh)
    return jax.jit(
        make_train_step(pipeline, selection, loss_cfg, tx, seed=seed, stop_sot_kv_grad=stop_sot_kv_grad),
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


@dataclasses.dataclass
class RunContext:
    config: ml_collections.ConfigDict
    workdir: storage.AnyPath
    pipeline: Pipeline
    concept: Concept
    mesh: jax.sharding.Mesh


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks that need no model, so bad input fails before anything is loaded or written."""
    if config.train.steps <= 0:
        raise TrainError(f"train.steps must be positive, got {config.train.steps}")
    if config.train.batch_size <= 0:
        raise TrainError(f"train.batch_size must be positive, got {config.train.batch_size}")
    if config.train.learning_rate <= 0:
        raise TrainError(f"train.learning_rate must be positive, got {config.train.learning_rate}")
    if config.anchors.num_images <= 0:
        raise TrainError(f"anchors.num_images must be positive, got {config.anchors.num_images}")
    if config.params not in params_lib.GROUPS:
        raise TrainError(f"unknown params group {config.params!r}; choose one of {', '.join(params_lib.GROUPS)}")
    if config.dtype not in ("float32", "bfloat16"):
        raise TrainError(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
    if config.mesh.fsdp < 1:
        raise TrainError(f"mesh.fsdp must be at least 1, got {config.mesh.fsdp}")
    loss_config(config).validate()


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
    return losses.LossConfig(loss=config.loss, teacher=config.teacher, prior_weight=config.prior_weight,
                             preserve_weight=config.preserve.weight)


def train(ctx: RunContext, *, progress: bool = True) -> dict[str, Any]:
    """Trains to ``train.steps`` (resuming from the latest checkpoint) and returns a summary."""
    from clu import metric_writers  # noqa: PLC0415  (imports TensorFlow; only training needs it)

    from ablate_jax import generate  # noqa: PLC0415

    config, pipeline, concept, mesh = ctx.config, ctx.pipeline, ctx.concept, ctx.mesh
    n_dev = mesh.devices.size
    if config.train.batch_size % n_dev:
        raise TrainError(f"train.batch_size {config.train.batch_size} is not a multiple of the {n_dev} devices")
    checkpointing.check_fingerprint(config, ctx.workdir, write=True)
    selection = checkpointing.selection_for(config, pipeline, concept)
    tx = checkpointing.optimizer_for(config)
    loss_cfg = loss_config(config)

    batch_sharding = sharding.batch_sharded(mesh)
    state_sharding, base_sharding = state_shardings(pipeline, selection, tx, mesh)
    base = sharding.put(pipeline.params, base_sharding)
    # The state is donated to every step, so it must not share buffers with the base (on one
    # device, putting an array where it already is returns the same buffer).
    trainable = jax.tree.map(jnp.copy, selection.split(pipeline.params))
    state = sharding.put(checkpointing.initial_state(trainable, tx), state_sharding)
    mngr = checkpointing.manager(ctx.workdir)
    start = 0
    if mngr.latest_step() is not None:
        state, position = checkpointing.restore(mngr, checkpointing.abstract_state(state, state_sharding))
        start = int(position["step"])
        log.info("resumed from the checkpoint at step %d", start)
    steps = config.train.steps
    if start >= steps:
        log.info("training already reached step %d of %d; nothing to do", start, steps)
        return {"steps": start, "seconds": 0.0, "skipped": True, "trainable": selection.count(pipeline.params)}

    data = AnchorBatches(
        generate.open_anchors(ctx.workdir), concept, lambda p: sampling.tokenize(pipeline, p),
        seed=config.seed, global_batch=config.train.batch_size, latent_factor=pipeline.vae_downsample,
        flip=config.train.flip, rescale=config.train.rescale, with_keep=loss_cfg.needs_keep,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    t = config.train
    step_fn = compiled_train_step(pipeline, selection, loss_cfg, t.clip_norm, config.seed, config.stop_sot_kv_grad,
                                  mesh)
    writer = metric_writers.create_default_writer(
        os.fspath(ctx.workdir / "logs"), just_logging=jax.process_index() > 0 or not config.train.tensorboard)
    log.info("training %s (%s scalars) for %d steps, global batch %d on %d devices%s",
             config.params, f"{selection.count(pipeline.params):,}", steps, config.train.batch_size, n_dev,
             f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
    if sharding.fsdp_size(mesh) > 1:
        log.info("fsdp: parameters and optimizer state split over %d devices", sharding.fsdp_size(mesh))

    def device_batch(step: int) -> dict[str, jax.Array]:
        local = data.batch(step)
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

    def check(metrics: dict[str, Any], step: int) -> None:
        if int(metrics["nonfinite"]) > 0 or not np.isfinite(float(metrics["loss"])):
            last = mngr.latest_step()
            raise TrainError(
                f"the loss became NaN or infinite by step {step}; stopped without saving "
                f"(last good checkpoint: {'step ' + str(last) if last is not None else 'none'}). "
                "Lower train.learning_rate or check the anchor images."
            )

    t0 = time.perf_counter()
    window_t, window_steps = time.perf_counter(), 0
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not progress or not distributed.is_primary())
    metrics = None
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    for step in range(start, steps):
        state, metrics = step_fn(state, base, device_batch(step))
        done = step + 1
        window_steps += 1
        bar.update(1)
        log_now = done % config.train.log_every == 0 or done == steps
        save_now = done % config.train.checkpoint_every == 0 or done == steps
        if log_now or save_now:
            m = jax.tree.map(sharding.to_host, metrics)
            check(m, done)
        if log_now:
            now = time.perf_counter()
            scalars = {k: float(v) for k, v in m.items() if k != "nonfinite"}
            scalars |= {"learning_rate": config.train.learning_rate, "steps_per_sec": window_steps / (now - window_t)}
            writer.write_scalars(done, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}")
            window_t, window_steps = now, 0
        if save_now:
            checkpointing.save(mngr, done, state, {"step": done, "examples_seen": done * config.train.batch_size})
        if delay:
            mngr.wait_until_finished()
            time.sleep(delay)
    bar.close()
    mngr.wait_until_finished()
    writer.flush()
    seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": seconds, "skipped": False, "trainable": selection.count(pipeline.params),
            "final_loss": float(sharding.to_host(metrics["loss"])) if metrics is not None else None}


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, pipeline: Pipeline | None = None,
        progress: bool = True) -> dict[str, Any]:
    """The whole job; returns the evaluation report (or a summary when evaluation is off).

    ``pipeline``: the model ``config.model`` names, already loaded (with ``config.dtype``). Runs
    that share one pipeline object in a process also share its compiled programs.
    """
    from ablate_jax import evaluate, generate  # noqa: PLC0415

    validate(config)
    workdir = storage.path(workdir)
    concept = config_lib.concept_from_config(config)
    if pipeline is None:
        pipeline = load_pipeline(config.model, dtype=jnp.dtype(config.dtype))
    if config.params == "embedding" and not params_lib.target_token_ids(pipeline.tokenizer, concept.targets,
                                                                         concept.anchor):
        raise TrainError(f"the target {concept.target!r} has no token of its own to train (all shared with the anchor)")
    # Refuse a foreign workdir before generating anything into it.
    checkpointing.check_fingerprint(config, workdir, write=False)
    ctx = RunContext(config, workdir, pipeline, concept, make_mesh(config))
    timing: dict[str, float] = {}

    t = time.perf_counter()
    anchors = generate.generate_anchors(config, workdir, pipeline=pipeline, mesh=ctx.mesh, progress=progress)
    timing["anchors"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = train(ctx, progress=progress)
    timing["train"] = time.perf_counter() - t

    report: dict[str, Any] = {}
    if config.eval.enabled:
        t = time.perf_counter()
        ablated = checkpointing.restore_ablated_params(config, workdir, pipeline)
        report = evaluate.evaluate_run(config, workdir, ablated_params=ablated, pipeline=pipeline, mesh=ctx.mesh,
                                       progress=progress, extra_sets=misspelled_sets(config, concept))
        timing["eval"] = time.perf_counter() - t
    if config.export.enabled:
        from ablate_jax import export  # noqa: PLC0415

        t = time.perf_counter()
        report["export"] = str(export.export_run(config, workdir, pipeline=pipeline))
        timing["export"] = time.perf_counter() - t
    report["timing_s"] = {**report.get("timing_s", {}), **timing}
    if config.eval.enabled and jax.process_index() == 0:
        evaluate.write_report(report, workdir / "eval")  # again, now with every stage's time
    report["anchors"], report["train"] = anchors, summary
    return report


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's mesh over every device of every process."""
    n, fsdp = jax.device_count(), config.mesh.fsdp
    if n % fsdp:
        raise TrainError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
    return sharding.make_mesh(fsdp=fsdp)


def misspelled_sets(config: ml_collections.ConfigDict, concept: Concept) -> tuple[EvalSet, ...]:
    """The target set with a one-letter misspelling of the target (the paper's robustness check)."""
    if not config.eval.misspelling or concept.kind == "memorization":
        return ()
    out = []
    for s in concept.eval_sets:
        if s.role != "target":
            continue
        target = concept.targets[0]
        wrong = misspell(target)
        prompts = tuple(replace_word(p, target, wrong) for p in s.prompts)
        if prompts != s.prompts:
            out.append(EvalSet(f"{s.name}_misspelled", "target_paraphrase", s.concept, prompts))
    return tuple(out)


# ------------------------------------------------------------------------------------------------ CLI

_ERRORS = (TrainError, distributed.DistributedError, ConceptError, config_lib.ConfigError, ModelLoadError, checkpointing.CheckpointError,
           params_lib.ParamsError, ValueError)


def main(argv: list[str]) -> None:
    from absl import flags  # noqa: PLC0415

    from ablate_jax import evaluate  # noqa: PLC0415

    del argv
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ablate_jax").setLevel(logging.INFO)
    # orbax and TensorFlow report every read and write at INFO through absl; keep the log to our stages.
    logging.getLogger("absl").setLevel(logging.WARNING)
    for name in ("fsspec", "gcsfs"):  # a line per file opened on a bucket
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if distributed.initialize_from_flags() and not workdir:
            # Each process would stamp its own time into the default name.
            raise TrainError("a multi-process run needs --workdir (a folder every process can reach)")
        workdir = workdir or str(Path("workdirs") / default_run_name(config))
        report = run(config, workdir, progress=sys.stderr.isatty() or not os.environ.get("CI"))
    except _ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if not distributed.is_primary():
        return
    if "sets" in report:
        print(evaluate.format_table(report))
    print(json.dumps(report.get("timing_s", {}), indent=None))
    print(f"workdir: {storage.path(workdir)}")


def default_run_name(config: ml_collections.ConfigDict) -> str:
    name = config.concept.preset or config.concept.target.split(";")[0].replace(" ", "_")
    return f"{name}-{config.params}-{time.strftime('%Y%m%d-%H%M%S')}"


def cli() -> None:
    from absl import app, flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/xattn.py[:concept=toy_smiley]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (default: workdirs/<concept>-<params>-<time>)")
    distributed.define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)


if __name__ == "__main__":
    cli()
