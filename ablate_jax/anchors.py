"""Anchor images: what the pretrained model draws for the anchor prompts (docs/design.md, "Anchor images").

``anchors.num_images`` images are spread evenly over the concept's usable anchor prompts (image
``i`` uses prompt ``i % len(prompts)``) and drawn with :func:`ablate_jax.text_to_image.draw`, the
batch sharded over the mesh's ``data`` axis. Image ``i`` depends only on ``seed`` and ``i``, so
the set is the same on 1, 8 or 64 devices and on any number of processes. For memorization
concepts, images that still reproduce the memorized image are dropped
(:mod:`ablate_jax.memorization`). The images go to the anchor store (:mod:`ablate_jax.anchor_store`)
shard by shard, so a rerun after an interruption draws only the missing shards; a rerun of a
finished set does nothing. With several processes, process ``p`` draws shards ``p, p + P, ...`` on
its own devices (no cross-process collective), and process 0 writes the metadata once all are
done; the workdir must then be a filesystem every process sees.

    python -m ablate_jax.anchors --config=configs/xattn.py --workdir=runs/smiley [--config.anchors.num_images=400]
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ablate_jax import anchor_store, distributed, memorization, sharding, text_to_image
from ablate_jax import config as config_lib
from ablate_jax.anchor_store import AnchorError, ShardPlan
from ablate_jax.models.loading import ModelLoadError, Pipeline, load_clip, load_pipeline
from ablate_jax.workdir import Workdir, WorkdirError, open_workdir

__all__ = ["AnchorError", "generate_anchors", "main"]

log = logging.getLogger(__name__)

# Anchor noise comes from fold_in(key(seed), ANCHOR_STREAM): a stream of its own, so anchor images
# never share noise with evaluation images drawn from the same seed.
ANCHOR_STREAM = 0x616E6368  # "anch" in ASCII


def _local_mesh(mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh:
    """``mesh`` if it spans only this process's devices, else a mesh over them.

    Each process draws its own shards, so a global mesh would only add cross-process traffic
    (and host-local inputs cannot feed it).
    """
    local = set(jax.local_devices())
    if mesh is not None and all(d in local for d in mesh.devices.flat):
        return mesh
    if mesh is not None:
        log.info("anchors: drawing on this process's %d devices only", len(local))
    return sharding.make_mesh(jax.local_devices())


def _draw_shards(workdir: Workdir, plan: ShardPlan, shards: Sequence[int], pipeline: Pipeline,
                 mesh: jax.sharding.Mesh, progress: bool) -> int:
    """Draws and writes ``shards``; returns the number of images drawn."""
    spec = workdir.spec
    config, out = spec.config, workdir.anchors_path
    cfg = config_lib.anchor_sampling(config)
    key = jax.random.fold_in(jax.random.key(config.seed), ANCHOR_STREAM)
    measure = None
    if spec.concept.kind == "memorization":
        measure = memorization.anchor_measure(spec, pipeline, mesh, lambda: load_clip(spec.evaluator_path))
    batch = config.anchors.batch_size * mesh.devices.size
    anchor_store.remove_stale(out, plan, shards)
    total = sum(len(plan.shard_range(s)) for s in shards)
    bar = tqdm(total=total, desc="anchors", unit="img", disable=not progress or not distributed.is_primary())
    drawn = dropped = 0
    try:
        for s in shards:
            indices = plan.shard_range(s)
            parts = []
            for lo in range(indices.start, indices.stop, batch):
                hi = min(lo + batch, indices.stop)
                prompts = [plan.prompt(i) for i in range(lo, hi)]
                parts.append(text_to_image.draw(pipeline, pipeline.params, prompts, key, cfg, start_index=lo,
                                                batch_size=batch, mesh=mesh))
                bar.update(hi - lo)
            images = np.concatenate(parts)
            keep = np.ones(len(images), bool) if measure is None else ~measure.memorized(images)
            kept = anchor_store.write_shard(out, plan, s, images, keep)
            drawn += len(images)
            if measure is not None:
                dropped += len(images) - kept
                bar.set_postfix(dropped=dropped)
                log.info("anchors: shard %d/%d: dropped %d of %d images that reproduce the memorized image "
                         "(%s similarity > %.3g)", s + 1, plan.num_shards, len(images) - kept, len(images),
                         measure.name, measure.threshold)
    finally:
        bar.close()
    return drawn


def generate_anchors(spec: config_lib.Spec | ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir, *,
                     pipeline: Pipeline | None = None, mesh: jax.sharding.Mesh | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Draws the run's anchor set, resumes an interrupted one, or finds it complete and does nothing.

    ``spec``: the run (a config is prepared first). ``pipeline``: the already loaded base model
    (else the spec's model is loaded, only when something is left to draw). ``mesh``: the devices
    to draw on; with several processes only a mesh over this process's devices is used. Returns
    ``{"num_images", "dropped", "seconds", "skipped", "generated", "resumed_shards", "num_shards",
    "path", "message"}``: the dataset's example count, the images dropped as memorized, and
    ``generated`` images drawn by this process in this call.
    """
    t0 = time.perf_counter()
    workdir = open_workdir(spec, workdir, ("anchors",))
    if workdir.spec.several:
        return _generate_each(workdir, pipeline, mesh, progress, t0)
    spec = workdir.spec
    config = spec.config
    out, record, plan, wanted, recorded = _plan(workdir)
    if anchor_store.is_complete(out, plan, record):
        assert record is not None
        summary = _summary(record, out, plan, seconds=time.perf_counter() - t0, skipped=True, generated=0,
                           resumed=plan.num_shards)
        if wanted < recorded:
            summary["message"] += f" (this run reads its first {wanted})"
        log.info("%s", summary["message"])
        return summary
    # Every process has checked the directory before any of them writes to it.
    distributed.barrier("ablate_jax.anchors.checked")

    pid, nproc = jax.process_index(), jax.process_count()
    if record is not None and recorded < wanted:
        log.info("anchors: extending the set of %d images in %s to %d", recorded, out, wanted)
        if pid == 0:
            anchor_store.extend(out, ShardPlan(recorded, plan.shard_size, plan.prompts, config.seed), plan, record)
        distributed.barrier("ablate_jax.anchors.extended")
        record = anchor_store.read_run(out)
    done = [s for s in range(plan.num_shards) if plan.shard_path(out, s).exists()]
    todo = [s for s in range(pid, plan.num_shards, nproc) if s not in set(done)]
    if done:
        log.info("anchors: resuming, %d of %d shards already written", len(done), plan.num_shards)
    if pipeline is None and (todo or (record is None and pid == 0)):
        pipeline = _load(spec)
    if record is None and pid == 0:
        # Written before the first shard, so that an interrupted set is recognised as this run's.
        assert pipeline is not None
        h, w, _ = text_to_image.latent_shape(pipeline, config_lib.anchor_sampling(config))
        f = pipeline.vae_downsample
        identity = workdir.anchor_identity
        record = {**identity, "complete": False, "num_shards": plan.num_shards, "shard_size": plan.shard_size,
                  "num_images_requested": plan.num_images, "image_shape": [h * f, w * f, 3],
                  "memorization": identity["inputs"].get("memorization")}
        anchor_store.write_json(out / anchor_store.RUN_FILE, record)

    generated = 0
    if todo:
        assert pipeline is not None
        generated = _draw_shards(workdir, plan, todo, pipeline, _local_mesh(mesh), progress)
    distributed.barrier("ablate_jax.anchors.shards")
    if pid == 0:
        assert record is not None
        record = anchor_store.finalize(out, plan, record)
    distributed.barrier("ablate_jax.anchors.finalized")
    if pid != 0:
        record = anchor_store.read_run(out)
        if record is None or not record.get("complete"):
            raise AnchorError(f"process 0 did not complete the anchor set in {out}; see its log")
    summary = _summary(record, out, plan, seconds=time.perf_counter() - t0, skipped=False, generated=generated,
                       resumed=len(done))
    log.info("%s", summary["message"])
    return summary


def _generate_each(workdir: Workdir, pipeline: Pipeline | None, mesh: jax.sharding.Mesh | None, progress: bool,
                   t0: float) -> dict[str, Any]:
    """A run of several concepts: each concept's set in turn (:attr:`Workdir.parts`), the model loaded once."""
    parts = {}
    for label, part in zip(workdir.spec.labels, workdir.parts, strict=True):
        log.info("anchors of %s", label)
        if pipeline is None and not anchor_store.is_complete(*_plan(part)[:3]):
            pipeline = _load(part.spec)
        parts[label] = generate_anchors(part.spec, part, pipeline=pipeline, mesh=mesh, progress=progress)
    keys = ("num_images", "dropped", "generated", "resumed_shards", "num_shards")
    summary: dict[str, Any] = {k: sum(p[k] for p in parts.values()) for k in keys}
    summary.update(seconds=time.perf_counter() - t0, skipped=all(p["skipped"] for p in parts.values()),
                   path=os.fspath(workdir.path / "anchors"), parts=parts,
                   message="; ".join(f"{label}: {p['message']}" for label, p in parts.items()))
    return summary


def _plan(workdir: Workdir) -> tuple[Any, dict[str, Any] | None, ShardPlan, int, int]:
    """``(out, record, plan, wanted, recorded)``: where the run's set lives, its record (None for none
    yet), the plan of the set to hold there, and the image counts the run wants and the record holds.
    A set of a shared store may hold another count of the same images (docs/sweeps.md): a larger one
    is read in part, a smaller one extended, so the plan covers the larger."""
    config = workdir.spec.config
    out = workdir.anchors_path
    record = anchor_store.read_run(out) if out.is_dir() else None
    wanted = int(config.anchors.num_images)
    recorded = int(record["num_images_requested"]) if record is not None else wanted
    plan = ShardPlan(max(wanted, recorded), config.anchors.shard_size, workdir.spec.concept.usable_anchor_prompts(),
                     config.seed)
    return out, record, plan, wanted, recorded


def _load(spec: config_lib.Spec) -> Pipeline:
    return load_pipeline(spec.model_path, dtype=jnp.bfloat16 if spec.config.dtype == "bfloat16" else None)


def _summary(record: dict[str, Any], out: Any, plan: ShardPlan, *, seconds: float, skipped: bool, generated: int,
             resumed: int) -> dict[str, Any]:
    kept, dropped = int(record.get("num_images", 0)), int(record.get("dropped", 0))
    memorizing = record.get("memorization") is not None
    if skipped:
        message = f"anchors already complete: {kept} images in {plan.num_shards} shards under {out}; nothing to do"
    else:
        message = f"wrote {kept} anchor images in {plan.num_shards} shards to {out} in {seconds:.1f} s"
        details = [f"{generated} drawn now"]
        if resumed:
            details.append(f"{resumed} of {plan.num_shards} shards were already written")
        if memorizing:
            details.append(f"{dropped} dropped as memorized")
        message += f" ({', '.join(details)})"
    return {"num_images": kept, "dropped": dropped, "seconds": seconds, "skipped": skipped, "generated": generated,
            "resumed_shards": resumed, "num_shards": plan.num_shards, "path": os.fspath(out), "message": message}


# ------------------------------------------------------------------------------------------------ CLI

_ERRORS = (AnchorError, WorkdirError, config_lib.ConfigError, ModelLoadError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ablate_jax.anchors --config=... --workdir=...``; returns the exit status."""
    from absl import flags  # noqa: PLC0415

    from ablate_jax import cli, preflight  # noqa: PLC0415

    argv = list(sys.argv if argv is None else argv)
    fv = cli.flag_values(argv, "the run's folder; anchors go to WORKDIR/anchors/")
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    if cli.help_requested(argv, fv, __doc__.splitlines()[0], "python -m ablate_jax.anchors "
                          "--config=FILE[:key=value,...] --workdir=DIR [--config.KEY=VALUE ...]"):
        return 0
    cli.configure_logging(absl_level=logging.ERROR)  # not even TFDS's notes on reading its own metadata
    try:
        config, path = cli.parse(fv, argv, AnchorError)
        spec = config_lib.prepare(config)
        workdir = preflight.check_run(spec, path, stages=("anchors",))
        summary = generate_anchors(spec, workdir, progress=fv.progress)
    except _ERRORS as err:
        print(f"error: {cli.one_line(err)}", file=sys.stderr)
        return 1
    if distributed.is_primary():
        print(summary["message"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
