"""Many ablations side by side: a sweep whose runs train in one jit-compiled program (docs/design.md,
"Sweeps"; user guide: docs/sweeps.md).

    python -m ablate_jax.sweep --config=configs/xattn.py --workdir=sweeps/lr \\
        --sweep=train.learning_rate=1e-4,3e-4,1e-3 --sweep=concept=toy_smiley,toy_striped

Each ``--sweep=KEY=V1,V2,...`` is an axis (``concept=`` picks a preset, as in the ``:arg``
string); the runs are every combination, each a run of its own in ``WORKDIR/NN-KEY=VALUE...``
with its checkpoints, report and export, as ``python -m ablate_jax.train`` would leave them.
Runs that share the program (model, parameter group, loss, teacher, which loss terms are on,
batch size, robust-ablation settings) train together: their trainable trees and optimizer
states are stacked on a leading axis and one step, ``vmap``-ed over it, advances all of them.
Learning rate, weight decay, step count, loss weights, concept and seed may differ between
them. Runs that read the same batches (same anchor set, concept and seed) take one batch
unbatched, so the frozen model's passes (VAE encoding, text encoding, the teacher's prediction)
are computed once per step for all of them. Anchor sets go to the shared store
``WORKDIR/anchors`` (``anchors.store``) and are drawn once per distinct set. A sweep resumes like
a run: rerun the same command.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ablate_jax import (
    anchor_store,
    checkpointing,
    distributed,
    losses,
    preflight,
    sharding,
    storage,
    train,
)
from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax.models.loading import Pipeline, load_pipeline
from ablate_jax.workdir import Workdir

log = logging.getLogger("ablate_jax")

SWEEP_FILE = "sweep.json"
ANCHOR_STORE = "anchors"  # WORKDIR/anchors: the sweep's shared anchor store, unless anchors.store names one
# The model is loaded once for the whole sweep, so these cannot differ between its runs.
UNSWEPT = ("model", "dtype", "mesh.fsdp")


class SweepError(ValueError):
    """A sweep that cannot run as given; the message says why."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of a sweep: its name, the values its axes give it, and its guarded workdir."""

    name: str
    values: tuple[tuple[str, str], ...]
    workdir: Workdir

    @property
    def spec(self) -> config_lib.Spec:
        return self.workdir.spec

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.workdir.spec.config


# ------------------------------------------------------------------------------------------------ planning


def parse_axes(axes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["train.learning_rate=1e-4,3e-4", "concept=a,b"]`` -> ``[(key, [values]), ...]`` (``concept``
    means ``concept.preset``)."""
    out: list[tuple[str, list[str]]] = []
    for axis in axes:
        if "=" not in axis:
            raise SweepError(f"--sweep={axis!r} must look like KEY=VALUE1,VALUE2,...")
        key, values = axis.split("=", 1)
        key = key.strip()
        key = "concept.preset" if key == "concept" else key
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise SweepError(f"--sweep={axis!r} gives no value")
        if len(set(vals)) != len(vals):
            raise SweepError(f"--sweep={axis!r} repeats a value")
        if key in UNSWEPT:
            raise SweepError(f"{key} cannot be swept: a sweep shares one loaded model (run separate sweeps)")
        if any(key == k for k, _ in out):
            raise SweepError(f"{key} is swept twice; give its values in one --sweep")
        out.append((key, vals))
    if not out:
        raise SweepError("a sweep needs at least one --sweep=KEY=VALUE1,VALUE2,...")
    return out


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.=+-]+")


def member_name(index: int, values: Sequence[tuple[str, str]]) -> str:
    """``NN-KEY=VALUE-...``: the run's index and its swept values, as one folder name."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in values]
    return _NAME_CHARS.sub("_", f"{index:02d}-" + "-".join(parts))[:96]


def expand(config: ml_collections.ConfigDict, axes: Sequence[str]) -> list[tuple[str, tuple[tuple[str, str], ...],
                                                                                 ml_collections.ConfigDict]]:
    """The sweep's runs in order: ``(name, swept values, config)``, the last axis varying fastest."""
    parsed = parse_axes(axes)
    out = []
    for i, combo in enumerate(itertools.product(*(vals for _, vals in parsed))):
        values = tuple((key, value) for (key, _), value in zip(parsed, combo, strict=True))
        c = copy.deepcopy(config)
        for key, value in values:
            if not config_lib.has_key(c, key):
                raise SweepError(f"unknown config key {key!r} (from --sweep)")
            try:
                config_lib.override(c, key, value)
            except config_lib.ConfigError as err:
                raise SweepError(f"--sweep {key}: {err}") from err
        out.append((member_name(i, values), values, c))
    return out


def plan(config: ml_collections.ConfigDict, axes: Sequence[str], workdir: str | os.PathLike, *,
         model_loaded: bool = False) -> list[Member]:
    """Every run of the sweep prepared and checked (each with every check of a run) before anything starts."""
    root = storage.path(workdir)
    if config.mesh.fsdp != 1:
        raise SweepError(f"mesh.fsdp={config.mesh.fsdp}: a sweep keeps each run's state whole on its group of devices "
                         "(the runs axis); use mesh.fsdp=1, or train runs too large for that one at a time")
    if config.concepts or any(a.split("=", 1)[0].strip() == "concepts" for a in axes):
        raise SweepError("concepts: a sweep's runs each remove one concept; run several concepts in one model with "
                         "python -m ablate_jax.train")
    members = []
    for name, values, c in expand(config, axes):
        if not c.anchors.store:
            c.anchors.store = os.fspath(root / ANCHOR_STORE)
        try:
            spec = config_lib.prepare(c)
            wd = preflight.check_run(spec, root / name, stages=("anchors", "eval", "export"),
                                     model_loaded=model_loaded or bool(members))
        except (config_lib.ConfigError, preflight.PreflightError, ValueError) as err:
            raise SweepError(f"run {name}: {err}") from err
        members.append(Member(name, values, wd))
    return members


def program_key(member: Member, selection: params_lib.Selection, adversary: train.Adversary | None) -> tuple:
    """What runs trained in one program must share: everything the compiled step is built from. Loss
    weights enter as values, but whether each term exists is part of the program."""
    c = member.config
    lc = config_lib.loss_config(c)
    return (c.params, c.loss, c.teacher, lc.prior_weight > 0, lc.preserve_weight > 0,
            lc.adversarial_weight > 0 and adversary is not None, c.stop_sot_kv_grad, c.train.batch_size,
            c.train.clip_norm, c.train.remat, c.train.encode_chunks, selection, adversary)


def programs(members: Sequence[Member], selections: Sequence[params_lib.Selection], pipeline: Pipeline
             ) -> list[list[int]]:
    """The runs' indices grouped by :func:`program_key`, each group in sweep order."""
    groups: dict[tuple, list[int]] = {}
    for i, (m, sel) in enumerate(zip(members, selections, strict=True)):
        groups.setdefault(program_key(m, sel, train.adversary_for(m.config, pipeline, m.spec.concept)), []).append(i)
    return list(groups.values())


def data_key(member: Member) -> tuple:
    """Runs with equal keys read the same batches at every step (and draw the same noise)."""
    c, lc = member.config, config_lib.loss_config(member.config)
    return (os.fspath(member.workdir.anchors_path), c.anchors.num_images, member.spec.concept, c.seed,
            c.train.batch_size, c.train.flip, c.train.rescale, float(c.robust.misspell), float(c.robust.paraphrase),
            float(c.robust.context), lc.needs_keep)


def runs_axis(n_runs: int, batch_size: int, n_devices: int, requested: int = 0) -> int:
    """The size of the mesh's ``runs`` axis: ``requested``, or the largest that divides both the runs
    and the devices while every run's batch still splits evenly over the rest."""
    def fits(r: int) -> bool:
        return n_devices % r == 0 and n_runs % r == 0 and batch_size % (n_devices // r) == 0

    if requested:
        if not fits(requested):
            raise SweepError(f"--runs_axis={requested} must divide the {n_runs} runs and the {n_devices} devices, "
                             f"and leave train.batch_size {batch_size} a multiple of the devices per run")
        return requested
    for r in range(math.gcd(n_runs, n_devices), 0, -1):
        if fits(r):
            return r
    raise SweepError(f"train.batch_size {batch_size} does not split over the devices of any layout of "
                     f"{n_runs} runs on {n_devices} devices; use a multiple of {n_devices}")


# ------------------------------------------------------------------------------------------------ training


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


@functools.lru_cache(maxsize=8)
def compiled_programs(pipeline: Pipeline, selection: params_lib.Selection, loss_cfg: losses.LossConfig,
                      clip_norm: float, stop_sot_kv_grad: bool, remat: str, encode_chunks: int,
                      adversary: train.Adversary | None, mesh: jax.sharding.Mesh, shared_data: bool,
                      shared_seed: int | None):
    """``(step, probe, take)``, jitted for runs stacked on the ``runs`` axis of ``mesh``; cached, so a
    sweep resumed or repeated in one process compiles nothing again.

    ``step(states, base, batch, seeds, weights, active, step)``: one train step of every run (an
    inactive run's state comes back unchanged), the states donated. ``probe(trainable, base, batch,
    seeds, weights)``: each run's objective on fixed draws and whether its parameters are finite.
    ``take(states, r)``: run ``r``'s state, replicated (to save). ``shared_data``: every run reads one
    batch (``[B, ...]``, else ``[runs, B, ...]``); ``shared_seed``: every run's seed, when they share
    one: the key is then a constant of the program, as in a run alone, and the draws (with every
    pass that depends only on them and the shared batch) are made once for all runs.
    """
    tx = params_lib.optimizer(1.0, weight_decay=0.0, clip_norm=clip_norm)  # rate and decay come from each state
    objective = train.make_objective(pipeline, selection, loss_cfg, stop_sot_kv_grad=stop_sot_kv_grad,
                                     remat=remat, encode_chunks=encode_chunks, adversary=adversary)
    b_ax = None if shared_data else 0

    def root_key(seed):
        return jax.random.key(shared_seed if shared_seed is not None else seed)

    def one_step(state, base, batch, seed, w, active, step):
        new, metrics = train.update(objective, tx, state, base, batch, jax.random.fold_in(root_key(seed), step), w)
        return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state), metrics

    def one_probe(trainable, base, batch, seed, w):
        return train.probe_value(objective, trainable, base, batch,
                                 jax.random.fold_in(root_key(seed), train.PROBE_STREAM), w)

    def step_all(states, base, batch, seed, w, active, step):
        def one(s, b, sd, ww, a):
            return one_step(s, base, b, sd, ww, a, step)

        return jax.vmap(one, in_axes=(0, b_ax, 0, 0, 0))(states, batch, seed, w, active)

    def probe_all(trainable, base, batch, seed, w):
        return jax.vmap(lambda p, b, sd, ww: one_probe(p, base, b, sd, ww), in_axes=(0, b_ax, 0, 0))(
            trainable, batch, seed, w)

    stacked, repl = sharding.run_stacked(mesh), sharding.replicated(mesh)
    batch_sharding = sharding.run_batch_sharded(mesh, stacked=not shared_data)
    step_fn = jax.jit(step_all, in_shardings=(stacked, repl, batch_sharding, stacked, stacked, stacked, repl),
                      out_shardings=(stacked, stacked), donate_argnums=(0,))
    probe_fn = jax.jit(probe_all, in_shardings=(stacked, repl, batch_sharding, stacked, stacked), out_shardings=repl)
    take = jax.jit(lambda states, r: jax.tree.map(lambda x: x[r], states), out_shardings=repl)
    return step_fn, probe_fn, take


def train_group(members: Sequence[Member], pipeline: Pipeline, *, requested_runs_axis: int = 0,
                progress: bool = True) -> list[dict[str, Any]]:
    """Trains runs that share a program together (see the module docstring); one summary per run, as
    :func:`ablate_jax.train.train` returns it (``failed``: why a diverged run stopped, else absent).

    Each run resumes from its own latest checkpoint; the step loop starts at the earliest and a
    run takes part from its own step on (an inactive run's state passes through the step
    unchanged). A run whose loss or probe diverges stops without saving, as a run alone would,
    and the others go on.
    """
    first = members[0]
    config, concept = first.config, first.spec.concept
    selection = checkpointing.selection_for(config, pipeline, concept)
    adversary = train.adversary_for(config, pipeline, concept)
    loss_cfg = config_lib.loss_config(config)
    t = config.train
    n_runs = len(members)
    mesh = sharding.make_run_mesh(runs_axis(n_runs, t.batch_size, jax.device_count(), requested_runs_axis))
    chunks = train.encode_chunks_for(t.encode_chunks, t.batch_size // mesh.shape[sharding.DATA])
    tx = params_lib.optimizer(1.0, weight_decay=0.0, clip_norm=t.clip_norm)  # rate and decay come from each state
    shared_data = len({data_key(m) for m in members}) == 1
    seeds = [int(m.config.seed) for m in members]
    weights = {k: np.asarray([getattr(config_lib.loss_config(m.config), f"{k}_weight") for m in members], np.float32)
               for k in ("prior", "preserve", "adversarial")}
    stacked, repl = sharding.run_stacked(mesh), sharding.replicated(mesh)
    batch_sharding = sharding.run_batch_sharded(mesh, stacked=not shared_data)

    base = sharding.put(params_lib.frozen_for_compute(pipeline.params, config.dtype), repl)
    initial = selection.split(pipeline.params)
    managers = [checkpointing.manager(m.workdir.path, barrier_prefix=f"run{i}") for i, m in enumerate(members)]
    abstract_one = checkpointing.abstract_state(
        jax.eval_shape(lambda: checkpointing.initial_state(initial, tx)), repl)
    states, starts = [], []
    for m, mngr in zip(members, managers, strict=True):
        if distributed.is_primary():
            m.workdir.record_checkpoints()
        state = checkpointing.initial_state(initial, checkpointing.optimizer_for(m.config))
        start = 0
        if mngr.latest_step() is not None:
            state, position = checkpointing.restore(mngr, abstract_one)
            start = int(position["step"])
            log.info("%s: resumed from the checkpoint at step %d", m.name, start)
        states.append(jax.tree.map(sharding.to_host, state))
        starts.append(start)
    ends = [int(m.config.train.steps) for m in members]
    summary = {"trainable": selection.count(pipeline.params), "runs_in_program": n_runs,
               "mesh": {k: int(v) for k, v in mesh.shape.items()}}
    if all(s >= e for s, e in zip(starts, ends, strict=True)):
        log.info("sweep: %d runs already trained; nothing to do", n_runs)
        return [{**summary, "steps": s, "seconds": 0.0, "skipped": True} for s in starts]
    step_fn, probe_fn, take = compiled_programs(
        pipeline, selection, loss_cfg, float(t.clip_norm), bool(config.stop_sot_kv_grad), t.remat, chunks, adversary,
        mesh, shared_data, seeds[0] if len(set(seeds)) == 1 else None)
    state = sharding.put(_stack(states), stacked)
    w_dev = sharding.put(weights, stacked)
    seed_dev = sharding.put(np.asarray(seeds, np.int32), stacked)

    sources: dict[tuple[str, int], anchor_store.AnchorSource] = {}
    loaders = []
    for m in (members[:1] if shared_data else members):
        at = (os.fspath(m.workdir.anchors_path), int(m.config.anchors.num_images))  # a set, read to a count
        if at not in sources:
            sources[at] = anchor_store.open_anchors(m.workdir)
        # Every process builds the whole global batch and hands each device its slice, whatever the
        # layout of runs over processes.
        loaders.append(train.anchor_batches(m.workdir, pipeline, source=sources[at]))

    def device_batch(step: int) -> dict[str, jax.Array]:
        parts = [loader.batch(step) for loader in loaders]
        host = parts[0] if shared_data else _stack(parts)
        return sharding.put(host, batch_sharding)

    probe_batch = device_batch(0)
    ref_loss, _ = probe_fn(sharding.put(_stack([initial] * n_runs), stacked), base, probe_batch, seed_dev, w_dev)
    reference = sharding.to_host(ref_loss)
    probe_losses: list[dict[int, float]] = [{} for _ in members]
    failed: dict[int, str] = {}
    writers = [train.metric_writer(m.workdir) for m in members]
    log.info("sweep: %d runs of %s (%s scalars each) in one program on a %s mesh; %s batches", n_runs,
             config.params, f"{selection.count(pipeline.params):,}", dict(mesh.shape),
             "shared" if shared_data else "per-run")

    def last_good(r: int) -> str:
        managers[r].wait_until_finished()
        last = managers[r].latest_step()
        return f"step {last}" if last is not None else "none"

    lo, hi = min(starts), max(ends)
    t0 = time.perf_counter()
    final_loss: list[float | None] = [None] * n_runs
    bar = tqdm(total=sum(max(0, e - s) for s, e in zip(starts, ends, strict=True)), desc="sweep", unit="step",
               disable=not progress or not distributed.is_primary())
    for step in range(lo, hi):
        active = np.asarray([starts[r] <= step < ends[r] and r not in failed for r in range(n_runs)])
        if not active.any():
            break
        state, metrics = step_fn(state, base, device_batch(step), seed_dev, w_dev, sharding.put(active, stacked),
                                 step)
        done = step + 1
        bar.update(int(active.sum()))
        due = [r for r in range(n_runs) if active[r]]
        log_now = [r for r in due if done % members[r].config.train.log_every == 0 or done == ends[r]]
        save_now = [r for r in due if done % members[r].config.train.checkpoint_every == 0 or done == ends[r]]
        if not log_now and not save_now:
            continue
        m_host = {k: sharding.to_host(v) for k, v in metrics.items()}
        for r in sorted(set(log_now) | set(save_now)):
            if train.nonfinite(m_host["loss"][r], m_host["nonfinite"][r]):
                failed[r] = train.nonfinite_message(done, last_good(r))
            final_loss[r] = float(m_host["loss"][r])
        for r in log_now:
            if r in failed:
                continue
            scalars = {k: float(v[r]) for k, v in m_host.items() if k != "nonfinite"}
            scalars["learning_rate"] = float(members[r].config.train.learning_rate)
            writers[r].write_scalars(done, scalars)
        save_now = [r for r in save_now if r not in failed]
        if save_now:
            loss, finite = (sharding.to_host(v) for v in probe_fn(state["params"], base, probe_batch, seed_dev,
                                                                   w_dev))
            for r in save_now:
                why = train.divergence(float(loss[r]), bool(finite[r]), float(reference[r]),
                                       members[r].config.train.divergence_factor)
                probe_losses[r][done] = float(loss[r])
                if why:
                    failed[r] = train.diverged_message(done, why, last_good(r))
                    continue
                checkpointing.save(managers[r], done, take(state, r),
                                   {"step": done, "examples_seen": done * members[r].config.train.batch_size})
    bar.close()
    for mngr, writer in zip(managers, writers, strict=True):
        mngr.wait_until_finished()
        writer.flush()
    seconds = time.perf_counter() - t0
    out = []
    for r, m in enumerate(members):
        one = {**summary, "steps": ends[r], "seconds": seconds, "skipped": starts[r] >= ends[r],
               "final_loss": final_loss[r], "probe_loss": {"before": float(reference[r]), **probe_losses[r]}}
        if r in failed:
            one["failed"] = failed[r]
            log.error("%s: %s", m.name, failed[r])
        out.append(one)
    return out


# ------------------------------------------------------------------------------------------------ the sweep


def run(config: ml_collections.ConfigDict, axes: Sequence[str], workdir: str | os.PathLike, *,
        pipeline: Pipeline | None = None, progress: bool = True, runs_axis: int = 0) -> dict[str, Any]:
    """The whole sweep: every run planned and checked, anchors drawn once per distinct set, each
    group of runs that share a program trained together, then each run evaluated and exported as a
    run alone would be. Returns ``{"runs": [...], "timing_s": {...}}`` and writes it to
    ``WORKDIR/sweep.json`` (with ``sweep.md``, a table of every run's sets)."""
    from ablate_jax import anchors  # noqa: PLC0415

    members = plan(config, axes, workdir, model_loaded=pipeline is not None)
    root = storage.path(workdir)
    first = members[0].spec
    log.info("sweep: %d runs of %s under %s", len(members), first.config.params, root)
    if pipeline is None:
        pipeline = load_pipeline(first.model_path, dtype=jnp.dtype(first.config.dtype))
    mesh = train.make_mesh(first.config)
    if distributed.is_primary():
        for m in members:
            preflight.write_resolved(m.spec, m.workdir.path)
    timing: dict[str, float] = {}

    t = time.perf_counter()
    drawn: dict[str, dict[str, Any]] = {}
    # The largest count of each set first: the runs that want fewer of its images then read them in part.
    for m in sorted(members, key=lambda m: -int(m.config.anchors.num_images)):
        key = os.fspath(m.workdir.anchors_path)
        if key not in drawn:
            drawn[key] = anchors.generate_anchors(m.spec, m.workdir, pipeline=pipeline, mesh=mesh, progress=progress)
    timing["anchors"] = time.perf_counter() - t

    selections = [checkpointing.selection_for(m.config, pipeline, m.spec.concept) for m in members]
    groups = programs(members, selections, pipeline)
    if len(groups) > 1:
        log.info("sweep: %d programs (runs that differ in what the step is built from train apart): %s",
                 len(groups), "; ".join(",".join(members[i].name[:2] for i in g) for g in groups))
    t = time.perf_counter()
    summaries: list[dict[str, Any]] = [{}] * len(members)
    for program, indices in enumerate(groups):
        for i, summary in zip(indices, train_group([members[i] for i in indices], pipeline,
                                                   requested_runs_axis=runs_axis, progress=progress), strict=True):
            summaries[i] = {**summary, "program": program}
    timing["train"] = time.perf_counter() - t

    results = []
    base_images: dict[Any, np.ndarray] = {}  # each evaluation set's base-model images, drawn once
    for m, sel, summary in zip(members, selections, summaries, strict=True):
        entry: dict[str, Any] = {"name": m.name, "values": dict(m.values), "workdir": os.fspath(m.workdir.path),
                                 "anchors": os.fspath(m.workdir.anchors_path), "train": summary}
        if "failed" not in summary:
            t = time.perf_counter()
            report = train.evaluate_and_export(train.RunContext(m.workdir, pipeline, mesh, sel),
                                               {"train": summary["seconds"]}, progress=progress,
                                               base_images=base_images)
            timing["eval_export"] = timing.get("eval_export", 0.0) + time.perf_counter() - t
            entry["sets"] = {name: {"role": s.get("role"), **s.get("clip_accuracy", {})}
                             for name, s in report.get("sets", {}).items()}
            if "export" in report:
                entry["export"] = report["export"]
        results.append(entry)
    out = {"axes": [list(a) for a in parse_axes(axes)], "runs": results, "timing_s": timing}
    if distributed.is_primary():
        storage.write_text(root / SWEEP_FILE, json.dumps(out, indent=1, default=str) + "\n")
        storage.write_text(root / "sweep.md", format_table(out) + "\n")
    return out


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per run, its swept values, then each set's CLIP accuracy after ablation."""
    runs = result["runs"]
    keys = [k for k, _ in result["axes"]]
    sets: list[str] = []
    for r in runs:
        sets += [s for s in r.get("sets", {}) if s not in sets]
    head = ["run", *(k.rsplit(".", 1)[-1] for k in keys), *sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r["name"][:2], *(r["values"].get(k, "") for k in keys)]
        if "failed" in r["train"]:
            cells += ["failed: " + r["train"]["failed"][:60]] + [""] * (len(sets) - 1)
        else:
            cells += [f"{r['sets'][s]['ablated']:.2f}" if s in r.get("sets", {}) and "ablated" in r["sets"][s] else ""
                      for s in sets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m ablate_jax.sweep --config=FILE[:...] --workdir=DIR --sweep=KEY=V1,V2 [...]``; the exit status
    (1 after one ``error:`` line, or when a run diverged)."""
    from absl import flags  # noqa: PLC0415

    from ablate_jax import cli  # noqa: PLC0415

    argv = list(sys.argv if argv is None else argv)
    fv = cli.flag_values(argv, "the sweep's folder: one subfolder per run, the shared anchor store, sweep.json")
    flags.DEFINE_multi_string("sweep", [], "an axis: KEY=VALUE1,VALUE2,... (repeat for more axes)", flag_values=fv)
    flags.DEFINE_integer("runs_axis", 0, "devices groups the runs are spread over (0: the most that fit)",
                         flag_values=fv)
    flags.DEFINE_bool("progress", True, "show progress bars", flag_values=fv)
    if cli.help_requested(argv, fv, __doc__.splitlines()[0], "python -m ablate_jax.sweep --config=FILE[:...] "
                          "--workdir=DIR --sweep=KEY=V1,V2,... [--sweep=...] [--config.KEY=VALUE ...]"):
        return 0
    cli.configure_logging(level=logging.INFO)
    try:
        config, workdir = cli.parse(fv, argv, SweepError)
        progress = fv.progress and (sys.stderr.isatty() or not os.environ.get("CI"))
        result = run(config, fv.sweep, workdir, progress=progress, runs_axis=fv.runs_axis)
    except (*train._ERRORS, SweepError) as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    if distributed.is_primary():
        print(format_table(result))
        print(json.dumps(result["timing_s"]))
        print(f"workdir: {storage.path(workdir)}")
    failed = [r["name"] for r in result["runs"] if "failed" in r["train"]]
    if failed:
        print(f"error: {len(failed)} of {len(result['runs'])} runs diverged ({', '.join(failed)}); see the log",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
