"""The anchor store: a run's anchor images as a TFDS dataset (array_record), written shard by shard.

Layout under ``WORKDIR/anchors/``::

    anchors-train.array_record-00000-of-00016   shard 0: images 0 .. shard_size-1 (PNG), prompt, index, seed
    ...                                          (the file name carries the shard count, for resumption)
    dataset_info.json, features.json             TFDS metadata, written once every shard exists
    run.json                                     the anchor identity; totals once complete
    preview.png                                  one row per anchor prompt, a few samples each
    tmp/                                         shards being written; never read

A shard is written under ``tmp/`` and renamed into place when complete, so no partial shard is
ever visible. :func:`open_anchors` reads a finished set with random access; :mod:`ablate_jax.data`
draws training batches from it. Drawing the images is :mod:`ablate_jax.anchors`' job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ablate_jax import storage
from ablate_jax.workdir import ANCHORS, RUN_FILE, TMP_DIR, Workdir, read_record

__all__ = ["AnchorError", "AnchorSource", "ShardPlan", "anchors_dir", "extend", "finalize", "first_images",
           "open_anchors", "read_run",
           "remove_stale", "shard_name", "write_json", "write_shard"]

log = logging.getLogger(__name__)

DATASET_NAME = "anchors"
SPLIT = "train"
PREVIEW_FILE = "preview.png"


class AnchorError(ValueError):
    """The anchor set cannot be generated or read; the message says why."""


def anchors_dir(workdir: str | os.PathLike) -> storage.AnyPath:
    """Where a run's anchor dataset lives: ``WORKDIR/anchors`` (absolute, or a ``gs://`` URL)."""
    return storage.path(workdir) / ANCHORS


def shard_name(shard: int, num_shards: int) -> str:
    """TFDS's default file name for shard ``shard`` of ``num_shards``."""
    return f"{DATASET_NAME}-{SPLIT}.array_record-{shard:05d}-of-{num_shards:05d}"


@dataclasses.dataclass(frozen=True)
class ShardPlan:
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


def read_run(out: Path) -> dict[str, Any] | None:
    """The set's ``run.json`` (None when absent), read as the workdir guard reads it."""
    return read_record(out / RUN_FILE, "an anchor run")


def _write_atomic(path: Path, data: bytes) -> None:
    """A reader sees the old file or the new one, never a part (local temporary files go to ``tmp/``)."""
    storage.write_bytes(path, data, tmp_dir=path.parent / TMP_DIR)


def write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def is_complete(out: Path, plan: ShardPlan, record: dict[str, Any] | None) -> bool:
    """The set of ``plan`` is finished: a complete record of its count, its metadata and every shard."""
    return (bool(record and record.get("complete")) and record.get("num_images_requested") == plan.num_images
            and (out / "dataset_info.json").exists()
            and all(plan.shard_path(out, s).exists() for s in range(plan.num_shards)))


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


def write_shard(out: Path, plan: ShardPlan, shard: int, images: np.ndarray, keep: np.ndarray) -> int:
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


def remove_stale(out: Path, plan: ShardPlan, shards: Sequence[int]) -> None:
    """Deletes half-written files that an interrupted run left for ``shards``."""
    tmp = out / TMP_DIR
    if not tmp.is_dir():
        return
    names = {shard_name(s, plan.num_shards) for s in shards}
    for f in tmp.iterdir():
        if f.name.rsplit(".", 1)[0] in names:
            f.unlink(missing_ok=True)


def _shard_lengths(out: Path, plan: ShardPlan) -> list[int]:
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    lengths = []
    for s in range(plan.num_shards):
        reader = ArrayRecordReader(os.fspath(plan.shard_path(out, s)))
        try:
            lengths.append(int(reader.num_records()))
        finally:
            reader.close()
    return lengths


def finalize(out: Path, plan: ShardPlan, record: dict[str, Any]) -> dict[str, Any]:
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
        description="Anchor images drawn by the pretrained model for the anchor prompts (ablate_jax.anchors).",
    )
    source = _open(out)
    if len(source) != kept:
        raise AnchorError(f"{out}: the dataset reads {len(source)} examples, expected {kept}")
    _write_preview(out / PREVIEW_FILE, source, plan, lengths)
    record = {**record, "complete": True, "num_images": kept, "dropped": dropped, "shard_lengths": lengths}
    if record.get("memorization") is not None:
        log.info("anchors: dropped %d of %d images that reproduce the memorized image", dropped, plan.num_images)
    write_json(out / RUN_FILE, record)  # last: the run record marks the set complete
    try:
        if not storage.is_remote(out):  # a bucket never holds tmp/
            (out / TMP_DIR).rmdir()
    except OSError:
        pass  # not empty: another process's leftovers, removed when that shard is redone
    return record


def _write_preview(path: Path, source: AnchorSource, plan: ShardPlan, lengths: Sequence[int]) -> None:
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


class AnchorSource:
    """Random access to an anchor set, in shard order then index order.

    ``source[i]`` is ``{"image": uint8 [H, W, 3], "prompt": str, "index": int, "seed": int}``.
    ``positions``: the records of the set to show, when it is read in part (:func:`open_anchors`).
    """

    def __init__(self, source: Any, path: Path, positions: Sequence[int] | None = None):
        self._source = source
        self.path = path
        self._positions = None if positions is None else list(positions)

    def __len__(self) -> int:
        return len(self._source) if self._positions is None else len(self._positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"anchor example {i} out of range for {n} examples")
        i %= n
        record = self._source[i if self._positions is None else self._positions[i]]
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


def open_anchors(workdir: str | os.PathLike | Workdir) -> AnchorSource:
    """The finished anchor set of a run as a random-access source (see :class:`AnchorSource`): its
    :attr:`Workdir.anchors_path <ablate_jax.workdir.Workdir.anchors_path>`, or ``WORKDIR/anchors`` for a path.
    A larger set of a shared store is read in part: the run's ``anchors.num_images`` first images, the very
    records a set of that count holds."""
    out = workdir.anchors_path if isinstance(workdir, Workdir) else anchors_dir(workdir)
    record = read_run(out) if out.is_dir() else None
    if not (record and record.get("complete")) or not (out / "dataset_info.json").exists():
        raise AnchorError(f"{out} holds no complete anchor set; run python -m ablate_jax.anchors first")
    source = _open(out)
    count = workdir.spec.config.anchors.num_images if isinstance(workdir, Workdir) else None
    if count is None or count >= int(record["num_images_requested"]):
        return source
    return AnchorSource(source._source, out, first_images(source, record, count))


def first_images(source: AnchorSource, record: dict[str, Any], count: int) -> list[int]:
    """The positions of the images with index below ``count``: whole shards, then the part of the shard
    that ``count`` ends in (its records are in index order)."""
    lengths, size = record["shard_lengths"], int(record["shard_size"])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    full = min(count // size, len(lengths))
    positions = list(range(offsets[full]))
    if full < len(lengths):
        for p in range(offsets[full], offsets[full + 1]):
            if source[p]["index"] >= count:
                break
            positions.append(p)
    return positions


def extend(out: Path, old: ShardPlan, new: ShardPlan, record: dict[str, Any]) -> dict[str, Any]:
    """Process 0: makes a set of ``old.num_images`` the start of one of ``new.num_images`` (same seed,
    prompts and shard size), and returns its record, now incomplete.

    Whole shards keep their images (image ``i`` depends only on the seed and ``i``) and are renamed
    for the new shard count; the last shard, when partial, is deleted to be drawn again whole, with
    the set's metadata. The record goes first, so an interruption leaves a set that resumes.
    """
    assert (old.shard_size, old.prompts, old.seed) == (new.shard_size, new.prompts, new.seed)
    record = {k: v for k, v in record.items() if k not in ("num_images", "dropped", "shard_lengths")}
    record.update(complete=False, num_shards=new.num_shards, num_images_requested=new.num_images)
    write_json(out / RUN_FILE, record)
    for name in ("dataset_info.json", "features.json", PREVIEW_FILE):
        if (out / name).exists():
            (out / name).unlink()
    for s in range(old.num_shards):
        src = old.shard_path(out, s)
        if not src.exists():
            continue
        if len(old.shard_range(s)) < old.shard_size:
            src.unlink()
        elif src != new.shard_path(out, s):
            src.rename(new.shard_path(out, s))
    return record
