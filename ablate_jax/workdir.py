"""A run's folder, and the one guard that keeps two runs from mixing in it.

``WORKDIR/`` holds ``anchors/`` (with ``run.json``, the identity of the images; with
``anchors.store`` the set lives in that shared store instead, under its identity's hash), ``checkpoints/``
(with ``run.json``, the identity of the training), ``eval/`` and ``export/`` (with
``export.json``). Each identity is the fingerprint of the config fields the stage's result
depends on (:func:`ablate_jax.config.fingerprint`), computed once from the run's
:class:`~ablate_jax.config.Spec`. :func:`open_workdir` compares every record the requested
stages would reuse with the run's identities, once, before the first stage, and refuses a
foreign one with the same wording for every stage: what it holds, which fields differ, and the
way out (docs/design.md, "One workdir guard").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ablate_jax import config as config_lib
from ablate_jax import memorization, storage

STAGES = ("anchors", "train", "eval", "export")
ANCHORS, CHECKPOINTS, EVAL, EXPORT = "anchors", "checkpoints", "eval", "export"
RUN_FILE = "run.json"  # the identity record of anchors/ and checkpoints/
EXPORT_RECORD = "export.json"
TMP_DIR = "tmp"  # anchors/tmp: shards being written, never read
_ANY_STEP = object()  # export_refusal without a step to compare
EXPORT_WAY_OUT = "replace it with --overwrite (python -m ablate_jax.export) or --config.export.overwrite=true"


class WorkdirError(ValueError):
    """The workdir holds another run's results, or a record that cannot be read; the message says which."""


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


def differences(recorded: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf that differs (dotted keys; tuples compare equal to lists)."""
    missing = object()
    a = _flatten(json.loads(json.dumps(recorded, default=str)))
    b = _flatten(json.loads(json.dumps(ours, default=str)))
    return [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def foreign(path: Any, what: str, diffs: Sequence[str], way_out: str = "") -> WorkdirError:
    """The one refusal: ``PATH holds WHAT of another run (DIFFERENCES); WAY OUT``."""
    way_out = way_out or f"use another --workdir or delete {path}"
    return WorkdirError(f"{path} holds {what} of another run ({'; '.join(diffs) or 'another identity'}); {way_out}")


def recorded_hash(record: Mapping[str, Any], fields: str, stored: str) -> Any:
    """The training identity's hash of a record, recomputed from its ``fields`` in canonical form
    (:func:`ablate_jax.config.fields_hash`), so that a setting added since, at its neutral value, does not
    disown it; the ``stored`` hash where the record holds no fields."""
    if isinstance(record.get(fields), Mapping):
        return config_lib.fields_hash(record[fields])
    return record.get(stored)


def read_record(path: Any, what: str, key: str = "fingerprint") -> dict[str, Any] | None:
    """A JSON record (None when absent); an unreadable one is refused with the way out."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} is unreadable ({type(e).__name__}); delete {path.parent} or use another "
                           "--workdir") from e
    if not isinstance(record, dict) or key not in record:
        raise WorkdirError(f"{path} is not {what} record of this project; delete {path.parent} or use another "
                           "--workdir")
    return record


def anchor_identity(spec: config_lib.Spec) -> dict[str, Any]:
    """What the anchor images depend on: the config fingerprint plus what it cannot see.

    ``fingerprint`` holds exactly ``fingerprint(config, *ANCHOR_KEYS)``; ``inputs`` adds the
    prompts' content (a prompt file can change under the same path), the compute dtype and, for
    memorization, the measure that decides which images are dropped.
    """
    prompts = "\n".join(spec.concept.usable_anchor_prompts())
    inputs: dict[str, Any] = {
        "dtype": spec.config.dtype,
        "anchor_prompts_sha256": hashlib.sha256(prompts.encode("utf-8")).hexdigest()[:16],
    }
    if spec.concept.kind == "memorization":
        inputs["memorization"] = memorization.anchor_measure_spec(spec)
    return {"fingerprint": config_lib.fingerprint(spec.config, *config_lib.ANCHOR_KEYS), "inputs": inputs}


COUNT_KEY = "anchors.num_images"


def _comparable(identity: Mapping[str, Any], *, count: bool = True) -> dict[str, Any]:
    fields = dict(identity.get("fingerprint", {}).get("fields", {}))
    if not count:
        fields.pop(COUNT_KEY, None)
    return {**fields, "inputs": identity.get("inputs", {})}


def anchor_key(identity: Mapping[str, Any]) -> str:
    """The name of an anchor set in a shared store: a hash of everything its images depend on but their
    count (image ``i`` depends only on the seed and ``i``, so a set of N holds every smaller one's images,
    and a larger count extends it)."""
    text = json.dumps(_comparable(identity, count=False), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


@dataclasses.dataclass(frozen=True, eq=False)
class Workdir:
    """A run's folder with the run's identities; made by :func:`open_workdir`, which guards it."""

    path: storage.AnyPath
    spec: config_lib.Spec
    # The anchor store of a part of a run of several concepts (WORKDIR/anchors when the config names none).
    store: storage.AnyPath | None = None

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @functools.cached_property
    def anchor_identity(self) -> dict[str, Any]:
        return anchor_identity(self.spec)

    @functools.cached_property
    def train_identity(self) -> dict[str, Any]:
        """The fingerprint of what the trained parameters depend on (checkpoints and export record it)."""
        return config_lib.fingerprint(self.spec.config, *config_lib.TRAIN_KEYS)

    @functools.cached_property
    def anchors_path(self) -> storage.AnyPath:
        """Where the run's anchor set lives: ``WORKDIR/anchors``, or ``STORE/<key>`` with ``anchors.store``
        (:func:`anchor_key`), where every run with the same anchor identity finds the same set."""
        store = self.shared_store
        if store:
            return storage.path(store) / anchor_key(self.anchor_identity)
        return self.path / ANCHORS

    @property
    def shared_store(self) -> storage.AnyPath | str | None:
        """The store the run's anchor set is one set of (``anchors.store``, or a part's), or None for its own."""
        return self.spec.config.anchors.store or self.store

    @functools.cached_property
    def parts(self) -> tuple[Workdir, ...]:
        """One workdir per concept (this one, for a run of one): a run of several keeps each concept's
        anchor set in ``WORKDIR/anchors/<key>`` (or the shared store), as the same concept removed alone
        would in a store, so either reuses the other's images."""
        if not self.spec.several:
            return (self,)
        store = None if self.spec.config.anchors.store else self.path / ANCHORS
        return tuple(Workdir(self.path, part, store) for part in self.spec.parts)

    def check_anchors(self) -> dict[str, Any] | None:
        """The anchor set's record (None for none yet); another run's, or files that are no anchor set, are refused."""
        out = self.anchors_path
        if not out.exists():
            return None
        if not out.is_dir():
            raise WorkdirError(f"{out} exists and is not a directory")
        record = read_record(out / RUN_FILE, "an anchor run")
        if record is None:
            if any(p.name != TMP_DIR for p in out.iterdir()):
                raise WorkdirError(f"{out} holds files but no {RUN_FILE}, so it is not an anchor set of this "
                                   "project; use another --workdir")
            return None
        # In a shared store a set of another count is this run's too: it is extended or read in part.
        shared = bool(self.shared_store)
        diffs = differences(_comparable(record, count=not shared), _comparable(self.anchor_identity, count=not shared))
        if diffs:
            raise foreign(out, "anchors", diffs)
        return record

    def check_checkpoints(self) -> None:
        """Checkpoints of another model or config are refused."""
        out = self.path / CHECKPOINTS
        record = read_record(out / RUN_FILE, "a checkpoint run", key="hash")
        if record is None:
            return
        ours = self.train_identity
        if recorded_hash(record, "fields", "hash") != ours["hash"]:
            raise foreign(out, "checkpoints", differences(config_lib.canonical_fields(record.get("fields", {})),
                                                           ours["fields"]))

    def record_checkpoints(self) -> None:
        """Writes the training identity beside the checkpoints (process 0), where none is yet."""
        path = self.path / CHECKPOINTS / RUN_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            storage.write_text(path, json.dumps(self.train_identity, indent=1, sort_keys=True))

    def export_record(self) -> dict[str, Any] | None:
        path = self.path / EXPORT / EXPORT_RECORD
        try:
            return json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            return None

    def export_refusal(self, record: Mapping[str, Any] | None, step: Any = _ANY_STEP) -> WorkdirError:
        """The refusal of an export that is not this run's: its record differs in the training identity
        or, when ``step`` (a checkpoint step, or None for none) is given, in the checkpoint step (else in
        the trained values)."""
        if record is None:
            diffs = ["no readable export.json"]
        else:
            diffs = differences(config_lib.canonical_fields(record.get("config", {})), self.train_identity["fields"])
            if step is not _ANY_STEP and record.get("checkpoint_step") != step:
                diffs.append(f"checkpoint step: {record.get('checkpoint_step')} -> {step}")
            diffs = diffs or ["its trained values"]
        return foreign(self.path / EXPORT, "an export", diffs, EXPORT_WAY_OUT)

    def check_export(self) -> None:
        """An export of another run is refused (unless ``export.overwrite``)."""
        if self.spec.config.export.overwrite or not (self.path / EXPORT).exists():
            return
        record = self.export_record()
        if record is None or recorded_hash(record, "config", "config_hash") != self.train_identity["hash"]:
            raise self.export_refusal(record)

    def guard(self, stages: Sequence[str]) -> None:
        """Every record the ``stages`` would reuse belongs to this run; nothing is written."""
        if {"anchors", "train"} & set(stages):
            for part in self.parts:
                part.check_anchors()
        if not self.path.exists():
            return
        if {"train", "eval", "export"} & set(stages):
            self.check_checkpoints()
        if "export" in stages and self.spec.config.export.enabled:
            self.check_export()


def open_workdir(spec: config_lib.Spec | Any, path: str | os.PathLike | Workdir,
                 stages: Sequence[str] = STAGES) -> Workdir:
    """``path`` as a guarded :class:`Workdir` of the run ``spec``; a Workdir of the same spec comes back as it is."""
    spec = config_lib.prepare(spec)
    if isinstance(path, Workdir):
        if path.spec is spec:
            return path
        path = path.path
    workdir = Workdir(storage.path(path), spec)
    workdir.guard(stages)
    return workdir
