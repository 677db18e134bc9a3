"""Anchor images: what the pretrained model draws for the anchor prompts (DESIGN.md section 1.3).

``anchors.num_images`` images are spread evenly over the concept's usable anchor prompts (image
``i`` uses prompt ``i % len(prompts)``) and drawn with the one sampling program of
:mod:`ablate_jax.sampling`, the batch sharded over the mesh's ``data`` axis. Image ``i`` depends
only on ``seed`` and ``i``, so the dataset is the same on 1, 8 or 64 devices and on any number of
processes. For memorization concepts, images that still reproduce the memorized image are
dropped (see :func:`memorization_measure`).

The result is a TFDS dataset (array_record) under ``WORKDIR/anchors/``::

    anchors-train.array_record-00000-of-00016   shard 0: images 0 .. shard_size-1 (PNG), prompt, index, seed
    ...                                          (the file name carries the shard count, for resumption)
    dataset_info.json, features.json             TFDS metadata, written once every shard exists
    run.json                                     the config fingerprint; totals once complete
    preview.png                                  one row per anchor prompt, a few samples each
    tmp/                                         shards being written; never read

A shard is written under ``tmp/`` and renamed into place when complete, so no partial shard is
ever visible, and a rerun after an interruption generates only the missing shards. A rerun of
a finished set does nothing; a workdir made with another model, concept or seed is refused.
With several processes, process ``p`` generates shards ``p, p + P, ...`` on its own devices (no
cross-process collective), and process 0 writes the metadata once all are done. The workdir
must then be a filesystem every process sees.

    python -m ablate_jax.generate --config=configs/xattn.py --workdir=runs/smiley [--config.anchors.num_images=400]
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ablate_jax import distributed, sampling, sharding, storage
from ablate_jax.concepts import Concept, ConceptError
from ablate_jax.config import ANCHOR_KEYS, ConfigError, anchor_sampling, concept_from_config, fingerprint, resolve
from ablate_jax.models.loading import CLIP, ModelLoadError, Pipeline, load_clip, load_pipeline
from ablate_jax.toy import is_toy_world

__all__ = [
    "AnchorError", "AnchorSource", "MemorizationMeasure", "anchors_dir", "check_existing", "clip_measure",
    "generate_anchors",
    "main", "memorization_measure", "open_anchors", "shard_name",
]

log = logging.getLogger(__name__)

# Anchor noise comes from fold_in(key(seed), ANCHOR_STREAM): a stream of its own, so anchor images
# never share noise with evaluation images drawn from the same seed.
ANCHOR_STREAM = 0x616E6368  # "anch" in ASCII
REFERENCE_STREAM = 0x6D656D6F  # "memo": reference images of the memorized caption (CLIP measure)

DATASET_NAME = "anchors"
SPLIT = "train"
RUN_FILE = "run.json"
PREVIEW_FILE = "preview.png"
TMP_DIR = "tmp"
# For tests only: seconds to sleep after each shard, so a test can kill a run part-way.
SHARD_DELAY_ENV = "ABLATE_JAX_TEST_SHARD_DELAY"


class AnchorError(ValueError):
    """The anchor set cannot be generated or read; the message says why."""


def anchors_dir(workdir: str | os.PathLike) -> storage.AnyPath:
    """Where a run's anchor dataset lives: ``WORKDIR/anchors`` (absolute, or a ``gs://`` URL)."""
    return storage.path(workdir) / "anchors"


def shard_name(shard: int, num_shards: int) -> str:
    """TFDS's default file name for shard ``shard`` of ``num_shards``."""
    return f"{DATASET_NAME}-{SPLIT}.array_record-{shard:05d}-of-{num_shards:05d}"


# ------------------------------------------------------------------------------------------------ plan


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which image goes where: the global index ``i`` fixes its prompt, its noise and its shard."""

    num_images: int
    shard_size: int
    prompts: tuple[str, ...]
    seed: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images))

    def prompt(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]

    def shard_path(self, out: Path, shard: int) -> Path:
        return out / shard_name(shard, self.num_shards)


def _validate(config: ml_collections.ConfigDict) -> tuple[Concept, sampling.SamplingConfig]:
    """Checks that need no model, so bad input fails before anything is loaded or written."""
    a = config.anchors
    for name in ("num_images", "shard_size", "batch_size"):
        if a[name] <= 0:
            raise AnchorError(f"anchors.{name} must be positive, got {a[name]}")
    if config.dtype not in ("float32", "bfloat16"):
        raise AnchorError(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
    cfg = anchor_sampling(config)
    try:
        cfg.validate()
    except ValueError as e:
        raise AnchorError(f"anchors: {e}") from e
    concept = concept_from_config(config)
    if concept.kind == "memorization" and not is_toy_world(config.model):
        if not 0.0 < a.memorization_threshold <= 1.0:
            raise AnchorError(f"anchors.memorization_threshold must be in (0, 1], got {a.memorization_threshold}")
        if a.memorization_references <= 0:
            raise AnchorError(f"anchors.memorization_references must be positive, got {a.memorization_references}")
    return concept, cfg


def _identity(config: ml_collections.ConfigDict, concept: Concept) -> dict[str, Any]:
    """What the images depend on: the config fingerprint plus what it cannot see.

    ``fingerprint`` holds exactly ``fingerprint(config, *ANCHOR_KEYS)`` (other phases compare
    it); ``inputs`` adds the prompts' content (a prompt file can change under the same path),
    the compute dtype and, for memorization, the measure that decides which images are dropped.
    """
    prompts = "\n".join(concept.usable_anchor_prompts())
    inputs: dict[str, Any] = {
        "dtype": config.dtype,
        "anchor_prompts_sha256": hashlib.sha256(prompts.encode("utf-8")).hexdigest()[:16],
    }
    if concept.kind == "memorization":
        inputs["memorization"] = _measure_spec(config)
    return {"fingerprint": fingerprint(config, *ANCHOR_KEYS), "inputs": inputs}


def _measure_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
    if is_toy_world(config.model):
        from ablate_jax.toy import world  # noqa: PLC0415

        return {"measure": "toy", "threshold": world.MEMORIZATION_THRESHOLD}
    a = config.anchors
    return {"measure": "clip", "clip": config.eval.clip, "threshold": a.memorization_threshold,
            "references": a.memorization_references}


# ------------------------------------------------------------------------------------------------ workdir state


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf that differs (dotted keys)."""
    missing = object()
    a, b = _flatten(old), _flatten(json.loads(json.dumps(new, default=str)))
    return [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
    fields = dict(identity.get("fingerprint", {}).get("fields", {}))
    return {**fields, "inputs": identity.get("inputs", {})}


def _read_run(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AnchorError(f"{path} is unreadable ({type(e).__name__}); delete {out} to start over") from e
    if not isinstance(record, dict) or "fingerprint" not in record:
        raise AnchorError(f"{path} is not an anchor run record; delete {out} to start over")
    return record


def _write_atomic(path: Path, data: bytes) -> None:
    """A reader sees the old file or the new one, never a part (local temporary files go to ``tmp/``)."""
    storage.write_bytes(path, data, tmp_dir=path.parent / TMP_DIR)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _check_workdir(out: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The existing run record (None for a fresh directory); a foreign one is refused."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise AnchorError(f"{out} exists and is not a directory")
    record = _read_run(out)
    if record is None:
        if any(p.name != TMP_DIR for p in out.iterdir()):
            raise AnchorError(f"{out} holds files but no {RUN_FILE}, so it is not an anchor set of this project; "
                              "use another --workdir")
        return None
    diffs = _differences(_comparable(record), _comparable(identity))
    if diffs:
        raise AnchorError(f"{out} holds anchors of another run ({'; '.join(diffs)}); "
                          f"use another --workdir or delete {out}")
    return record


def check_existing(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Refuses a workdir that holds anchors of another run (or files that are no anchor set); writes nothing."""
    config = resolve(config)
    concept, _ = _validate(config)
    _check_workdir(anchors_dir(workdir), _identity(config, concept))


def _is_complete(out: Path, plan: _Plan, record: dict[str, Any] | None) -> bool:
    return bool(record and record.get("complete")) and (out / "dataset_info.json").exists() and all(
        plan.shard_path(out, s).exists() for s in range(plan.num_shards))


# ------------------------------------------------------------------------------------------------ processes
# Indirections so that tests can stand in several processes with threads.


def _process_index() -> int:
    return jax.process_index()


def _process_count() -> int:
    return jax.process_count()


def _barrier(name: str) -> None:
    distributed.barrier(name)


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


# ------------------------------------------------------------------------------------------------ memorization


@dataclasses.dataclass(frozen=True)
class MemorizationMeasure:
    """Decides which images still reproduce the memorized image: ``similarity(images) > threshold``."""

    name: str
    threshold: float
    similarity: Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float [N]
    references: np.ndarray | None = None  # the images compared with, where the measure draws them

    def memorized(self, images: np.ndarray) -> np.ndarray:
        """Boolean ``[N]``: True for images to drop."""
        return np.asarray(self.similarity(images)) > self.threshold


def memorization_measure(config: ml_collections.ConfigDict, concept: Concept, pipeline: Pipeline,
                         mesh: jax.sharding.Mesh | None = None) -> MemorizationMeasure:
    """The toy world's own measure for the toy model; CLIP image cosine (:func:`clip_measure`) otherwise."""
    if is_toy_world(config.model):
        from ablate_jax.toy import world  # noqa: PLC0415

        return MemorizationMeasure("toy", world.MEMORIZATION_THRESHOLD, world.memorization_similarity)
    return clip_measure(config, concept, pipeline, mesh)


def clip_measure(config: ml_collections.ConfigDict, concept: Concept, pipeline: Pipeline,
                 mesh: jax.sharding.Mesh | None = None, *, clip: CLIP | None = None) -> MemorizationMeasure:
    """Max CLIP image-embedding cosine to images the base model draws from the memorized caption.

    The memorized image itself is rarely at hand, but the base model reproduces it from its
    caption (that is what memorization means), so its own samples stand in for it.
    """
    from ablate_jax.evaluate import image_embeddings  # noqa: PLC0415  (evaluation imports more than we need)

    a = config.anchors
    clip = clip or load_clip(config.eval.clip)
    mesh = _local_mesh(mesh)
    key = jax.random.fold_in(jax.random.key(config.seed), REFERENCE_STREAM)
    references = sampling.generate(pipeline, pipeline.params, [concept.targets[0]] * a.memorization_references, key,
                                   anchor_sampling(config), batch_size=a.batch_size * mesh.devices.size, mesh=mesh)
    ref_emb = image_embeddings(clip, references)

    def similarity(images: np.ndarray) -> np.ndarray:
        return (image_embeddings(clip, images) @ ref_emb.T).max(axis=1)

    return MemorizationMeasure("clip", float(a.memorization_threshold), similarity, references)


# ------------------------------------------------------------------------------------------------ writing


def _features(image_shape: Sequence[int]):
    import tensorflow_datasets as tfds  # noqa: PLC0415

    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=tuple(image_shape), encoding_format="png"),
        "prompt": tfds.features.Text(),
        "index": tfds.features.Scalar(np.int64),
        "seed": tfds.features.Scalar(np.int64),
    })


def _png(image: np.ndarray) -> io.BytesIO:
    # Encoded here with PIL rather than by TFDS, which would import TensorFlow for it.
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png")
    buf.seek(0)
    return buf


def _write_shard(out: Path, plan: _Plan, shard: int, images: np.ndarray, keep: np.ndarray) -> int:
    """Writes the kept images of one shard to ``tmp/`` and renames it into place; returns how many."""
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    features = _features(images.shape[1:])
    final = plan.shard_path(out, shard)
    # array_record writes local files only: build the shard in tmp/ (or, for a bucket, a local
    # staging folder) and move it into place whole.
    with contextlib.ExitStack() as cleanup:
        tmp_dir = cleanup.enter_context(storage.staging(out, "ablate_jax-anchors-")) if storage.is_remote(out) \
            else out / TMP_DIR
        tmp = tmp_dir / f"{final.name}.{os.getpid()}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")  # group_size 1: cheap random access
        try:
            for index, image, k in zip(plan.shard_range(shard), images, keep, strict=True):
                if k:
                    writer.write(features.serialize_example(
                        {"image": _png(image), "prompt": plan.prompt(index), "index": index, "seed": plan.seed}))
            writer.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            storage.move(tmp, final)
        except BaseException:
            try:
                writer.close()
            except Exception:  # noqa: BLE001  (already closed, or broken by the error being raised)
                pass
            tmp.unlink(missing_ok=True)
            raise
    return int(keep.sum())


def _remove_stale(out: Path, plan: _Plan, shards: Sequence[int]) -> None:
    """Deletes half-written files that an interrupted run left for ``shards``."""
    tmp = out / TMP_DIR
    if not tmp.is_dir():
        return
    names = {shard_name(s, plan.num_shards) for s in shards}
    for f in tmp.iterdir():
        if f.name.rsplit(".", 1)[0] in names:
            f.unlink(missing_ok=True)


def _generate_shards(config: ml_collections.ConfigDict, concept: Concept, plan: _Plan, out: Path,
                     shards: Sequence[int], pipeline: Pipeline, mesh: jax.sharding.Mesh,
                     cfg: sampling.SamplingConfig, progress: bool) -> int:
    """Draws and writes ``shards``; returns the number of images drawn."""
    key = jax.random.fold_in(jax.random.key(config.seed), ANCHOR_STREAM)
    measure = memorization_measure(config, concept, pipeline, mesh) if concept.kind == "memorization" else None
    batch = config.anchors.batch_size * mesh.devices.size
    delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)
    _remove_stale(out, plan, shards)
    total = sum(len(plan.shard_range(s)) for s in shards)
    bar = tqdm(total=total, desc="anchors", unit="img", disable=not progress or _process_index() != 0)
    drawn = dropped = 0
    try:
        for s in shards:
            indices = plan.shard_range(s)
            parts = []
            for lo in range(indices.start, indices.stop, batch):
                hi = min(lo + batch, indices.stop)
                prompts = [plan.prompt(i) for i in range(lo, hi)]
                parts.append(sampling.generate(pipeline, pipeline.params, prompts, key, cfg, start_index=lo,
                                               batch_size=batch, mesh=mesh))
                bar.update(hi - lo)
            images = np.concatenate(parts)
            keep = np.ones(len(images), bool) if measure is None else ~measure.memorized(images)
            kept = _write_shard(out, plan, s, images, keep)
            drawn += len(images)
            if measure is not None:
                dropped += len(images) - kept
                bar.set_postfix(dropped=dropped)
                log.info("anchors: shard %d/%d: dropped %d of %d images that reproduce the memorized image "
                         "(%s similarity > %.3g)", s + 1, plan.num_shards, len(images) - kept, len(images),
                         measure.name, measure.threshold)
            if delay:
                time.sleep(delay)
    finally:
        bar.close()
    return drawn


def _shard_lengths(out: Path, plan: _Plan) -> list[int]:
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    lengths = []
    for s in range(plan.num_shards):
        reader = ArrayRecordReader(os.fspath(plan.shard_path(out, s)))
        try:
            lengths.append(int(reader.num_records()))
        finally:
            reader.close()
    return lengths


def _finalize(out: Path, plan: _Plan, record: dict[str, Any], concept: Concept) -> dict[str, Any]:
    """Process 0, once every shard exists: TFDS metadata, preview, and the completed run record."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    missing = [s for s in range(plan.num_shards) if not plan.shard_path(out, s).exists()]
    if missing:
        raise AnchorError(f"{len(missing)} of {plan.num_shards} anchor shards are missing after generation "
                          f"(first: {shard_name(missing[0], plan.num_shards)}); rerun to generate them")
    lengths = _shard_lengths(out, plan)
    kept = sum(lengths)
    dropped = plan.num_images - kept
    if kept == 0:
        raise AnchorError(f"all {plan.num_images} anchor images reproduce the memorized image and were dropped; "
                          "use anchor prompts that do not name the memorized caption")
    num_bytes = sum(storage.size(plan.shard_path(out, s)) for s in range(plan.num_shards))
    tfds.folder_dataset.write_metadata(
        data_dir=os.fspath(out),
        features=_features(record["image_shape"]),
        split_infos=[tfds.core.SplitInfo(name=SPLIT, shard_lengths=lengths, num_bytes=num_bytes)],
        check_data=False,  # the reading check goes through tf.data; open_anchors is checked below instead
        description="Anchor images drawn by the pretrained model for the anchor prompts (ablate_jax.generate).",
    )
    source = _open(out)
    if len(source) != kept:
        raise AnchorError(f"{out}: the dataset reads {len(source)} examples, expected {kept}")
    _write_preview(out / PREVIEW_FILE, source, plan, lengths)
    record = {**record, "complete": True, "num_images": kept, "dropped": dropped, "shard_lengths": lengths}
    if concept.kind == "memorization":
        log.info("anchors: dropped %d of %d images that reproduce the memorized image", dropped, plan.num_images)
    _write_json(out / RUN_FILE, record)  # last: the run record marks the set complete
    try:
        if not storage.is_remote(out):  # a bucket never holds tmp/
            (out / TMP_DIR).rmdir()
    except OSError:
        pass  # not empty: another process's leftovers, removed when that shard is redone
    return record


# ------------------------------------------------------------------------------------------------ preview


def _write_preview(path: Path, source: AnchorSource, plan: _Plan, lengths: Sequence[int]) -> None:
    """About 32 images grouped by prompt: each labelled cell holds one prompt's first few images."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    n_prompts = len(plan.prompts)
    cols = min(4, math.ceil(plan.num_images / n_prompts))  # images per prompt shown
    n_cells = min(n_prompts, plan.num_images, max(1, 32 // cols))
    per_row = 2 if cols <= 2 else 1  # few images per prompt: two prompts side by side
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    cache: dict[int, dict[int, np.ndarray]] = {}

    def image_at(index: int) -> np.ndarray | None:
        shard = index // plan.shard_size
        if shard not in cache:
            examples = (source[int(p)] for p in range(offsets[shard], offsets[shard + 1]))
            cache[shard] = {e["index"]: e["image"] for e in examples}
        return cache[shard].get(index)  # None: dropped as memorized

    side = max(source[0]["image"].shape[:2])
    tile = side * max(1, 64 // side) if side < 64 else min(side, 128)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = min(300, 12 + max(int(measure.textlength(p, font=font)) for p in plan.prompts[:n_cells]))
    gap = 2
    cell_w = label_w + cols * (tile + gap)
    canvas = Image.new("RGB", (per_row * cell_w, math.ceil(n_cells / per_row) * (tile + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for cell in range(n_cells):
        x0, y = (cell % per_row) * cell_w, (cell // per_row) * (tile + gap)
        text = plan.prompts[cell]
        while draw.textlength(text, font=font) > label_w - 12 and len(text) > 1:
            text = text[:-2] + "\N{HORIZONTAL ELLIPSIS}"
        draw.text((x0 + 6, y + tile // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
        for c in range(cols):
            index = cell + c * n_prompts  # image i uses prompt i % n_prompts
            if index >= plan.num_images:
                break
            x = x0 + label_w + c * (tile + gap)
            image = image_at(index)
            if image is None:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(200, 200, 200))
                continue
            resample = Image.NEAREST if tile >= side else Image.BICUBIC
            canvas.paste(Image.fromarray(image).resize((tile, tile), resample), (x, y))
    buf = io.BytesIO()
    canvas.save(buf, format="png")
    _write_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ public API


def generate_anchors(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                     pipeline: Pipeline | None = None, mesh: jax.sharding.Mesh | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Generates the run's anchor set, resumes an interrupted one, or finds it complete and does nothing.

    ``pipeline``: the already loaded base model (else ``config.model`` is loaded, only when
    something is left to draw). ``mesh``: the devices to draw on; with several processes only a
    mesh over this process's devices is used. Returns ``{"num_images", "dropped", "seconds",
    "skipped", "generated", "resumed_shards", "num_shards", "path", "message"}``: the dataset's
    example count, the images dropped as memorized, and ``generated`` images drawn by this
    process in this call.
    """
    t0 = time.perf_counter()
    config = resolve(config)
    concept, cfg = _validate(config)
    out = anchors_dir(workdir)
    plan = _Plan(config.anchors.num_images, config.anchors.shard_size, concept.usable_anchor_prompts(), config.seed)
    identity = _identity(config, concept)
    record = _check_workdir(out, identity)
    if _is_complete(out, plan, record):
        assert record is not None
        summary = _summary(record, out, plan, seconds=time.perf_counter() - t0, skipped=True, generated=0,
                           resumed=plan.num_shards)
        log.info("%s", summary["message"])
        return summary
    # Every process has checked the directory before any of them writes to it.
    _barrier("ablate_jax.generate.checked")

    pid, nproc = _process_index(), _process_count()
    done = [s for s in range(plan.num_shards) if plan.shard_path(out, s).exists()]
    todo = [s for s in range(pid, plan.num_shards, nproc) if s not in set(done)]
    if done:
        log.info("anchors: resuming, %d of %d shards already written", len(done), plan.num_shards)
    if pipeline is None and (todo or (record is None and pid == 0)):
        pipeline = load_pipeline(config.model, dtype=jnp.bfloat16 if config.dtype == "bfloat16" else None)
    if record is None and pid == 0:
        # Written before the first shard, so that an interrupted set is recognised as this run's.
        assert pipeline is not None
        h, w, _ = sampling.latent_shape(pipeline, cfg)
        f = pipeline.vae_downsample
        record = {**identity, "complete": False, "num_shards": plan.num_shards, "shard_size": plan.shard_size,
                  "num_images_requested": plan.num_images, "image_shape": [h * f, w * f, 3],
                  "memorization": identity["inputs"].get("memorization")}
        _write_json(out / RUN_FILE, record)

    generated = 0
    if todo:
        assert pipeline is not None
        mesh = _local_mesh(mesh)
        generated = _generate_shards(config, concept, plan, out, todo, pipeline, mesh, cfg, progress)
    _barrier("ablate_jax.generate.shards")
    if pid == 0:
        assert record is not None
        record = _finalize(out, plan, record, concept)
    _barrier("ablate_jax.generate.finalized")
    if pid != 0:
        record = _read_run(out)
        if record is None or not record.get("complete"):
            raise AnchorError(f"process 0 did not complete the anchor set in {out}; see its log")
    summary = _summary(record, out, plan, seconds=time.perf_counter() - t0, skipped=False, generated=generated,
                       resumed=len(done))
    log.info("%s", summary["message"])
    return summary


def _summary(record: dict[str, Any], out: Path, plan: _Plan, *, seconds: float, skipped: bool, generated: int,
             resumed: int) -> dict[str, Any]:
    kept, dropped = int(record.get("num_images", 0)), int(record.get("dropped", 0))
    memorization = record.get("memorization") is not None
    if skipped:
        message = f"anchors already complete: {kept} images in {plan.num_shards} shards under {out}; nothing to do"
    else:
        message = f"wrote {kept} anchor images in {plan.num_shards} shards to {out} in {seconds:.1f} s"
        details = [f"{generated} drawn now"]
        if resumed:
            details.append(f"{resumed} of {plan.num_shards} shards were already written")
        if memorization:
            details.append(f"{dropped} dropped as memorized")
        message += f" ({', '.join(details)})"
    return {"num_images": kept, "dropped": dropped, "seconds": seconds, "skipped": skipped, "generated": generated,
            "resumed_shards": resumed, "num_shards": plan.num_shards, "path": os.fspath(out), "message": message}


class AnchorSource:
    """Random access to an anchor set, in shard order then index order.

    ``source[i]`` is ``{"image": uint8 [H, W, 3], "prompt": str, "index": int, "seed": int}``.
    """

    def __init__(self, source: Any, path: Path):
        self._source = source
        self.path = path

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self._source)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"anchor example {i} out of range for {n} examples")
        record = self._source[i % n]
        prompt = record["prompt"]
        return {
            "image": np.asarray(record["image"]),
            "prompt": prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt),
            "index": int(record["index"]),
            "seed": int(record["seed"]),
        }

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"AnchorSource({os.fspath(self.path)!r}, {len(self)} examples)"


def _open(out: Path) -> AnchorSource:
    import tensorflow_datasets as tfds  # noqa: PLC0415

    return AnchorSource(tfds.builder_from_directory(os.fspath(out)).as_data_source(SPLIT), out)


def open_anchors(workdir: str | os.PathLike) -> AnchorSource:
    """The finished anchor set of ``workdir`` as a random-access source (see :class:`AnchorSource`)."""
    out = anchors_dir(workdir)
    record = _read_run(out) if out.is_dir() else None
    if not (record and record.get("complete")) or not (out / "dataset_info.json").exists():
        raise AnchorError(f"{out} holds no complete anchor set; run python -m ablate_jax.generate first")
    return _open(out)


# ------------------------------------------------------------------------------------------------ CLI

_ERRORS = (AnchorError, ConceptError, ConfigError, ModelLoadError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ablate_jax.generate --config=... --workdir=...``; returns the exit status."""
    from absl import flags  # noqa: PLC0415

    from ablate_jax import cli  # noqa: PLC0415

    argv = list(sys.argv if argv is None else argv)
    fv = cli.flag_values(argv, "the run's folder; anchors go to WORKDIR/anchors/")
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    if cli.help_requested(argv, fv, __doc__.splitlines()[0], "python -m ablate_jax.generate "
                          "--config=FILE[:key=value,...] --workdir=DIR [--config.KEY=VALUE ...]"):
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ablate_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's notes on reading its own metadata
    try:
        config, workdir = cli.parse(fv, argv, AnchorError)
        from ablate_jax import preflight  # noqa: PLC0415

        config = resolve(config)
        preflight.check_run(config, workdir, stages=("anchors",))
        summary = generate_anchors(config, workdir, progress=fv.progress)
    except _ERRORS as err:
        print(f"error: {cli.one_line(err)}", file=sys.stderr)
        return 1
    if _process_index() == 0:
        print(summary["message"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
