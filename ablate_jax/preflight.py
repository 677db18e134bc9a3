"""Every check of every stage, run before the first stage starts.

A run that would fail at evaluation must not first spend an hour drawing anchors and training;
a bad input must not leave a half-made workdir behind. :func:`check_run` therefore asks, without
loading any weights or writing anything, every question a stage would ask later: the config's
values and choices (:func:`ablate_jax.config.check`), the workdir (reachable, a folder, writable,
not another run's: :mod:`ablate_jax.workdir`), the model and evaluator files (present and whole), the evaluation sets, the
device layout, and the parameter group's hold on this model's tokenizer. Each failure is one
:class:`PreflightError` line naming the problem (docs/design.md, "Failing early").
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from ablate_jax import config as config_lib
from ablate_jax import storage
from ablate_jax.models import loading
from ablate_jax.workdir import STAGES, Workdir, WorkdirError, open_workdir


class PreflightError(ValueError):
    """A run that cannot succeed as configured; the message says why."""


def _reason(err: BaseException) -> str:
    return loading.cli_line(err) if str(err).strip() else type(err).__name__


def check_workdir(workdir: str | os.PathLike) -> None:
    """The workdir is reachable, a folder (or not there yet) and writable; nothing in it is changed.

    A local workdir is tested by creating and removing one empty file in the nearest folder that
    exists (the workdir itself, or the parent it would be made in): permission bits alone do not
    show a read-only file system, nor what root may do.
    """
    text = os.fspath(workdir)
    if storage.is_remote(text):
        path = storage.path(text)
        try:
            # The storage clients log each retry with its traceback; the one line below says it all.
            with _quiet("gcsfs", "fsspec", "google", "urllib3", "aiohttp"):
                is_file = path.exists() and not path.is_dir()
        except Exception as err:  # noqa: BLE001  (gcsfs and TensorFlow raise many kinds for one cause)
            raise PreflightError(f"cannot reach --workdir {text} ({type(err).__name__}: {_reason(err)}); check the "
                                 "bucket name and the credentials (gcloud auth application-default login)") from err
        if is_file:
            raise PreflightError(f"--workdir {text} is a file, not a folder")
        return
    path = Path(text).expanduser().absolute()
    try:
        if path.exists() and not path.is_dir():
            raise PreflightError(f"--workdir {path} is a file, not a folder")
        existing = path
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
    except OSError as err:  # a folder on the way that this user may not enter
        raise PreflightError(f"--workdir {path} cannot be reached ({err.strerror or type(err).__name__})") from err
    if not existing.is_dir():
        raise PreflightError(f"--workdir {path} cannot be made: {existing} is a file")
    probe = existing / f".ablate_jax-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as err:
        why = "read-only file system" if err.errno == errno.EROFS else err.strerror or type(err).__name__
        raise PreflightError(f"--workdir {path} is not writable ({why} at {existing})") from err


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_model(spec: config_lib.Spec) -> None:
    """The pipeline folder (or hub id) is there and its files are whole."""
    try:
        loading.check_pipeline(spec.model_path)
    except loading.ModelLoadError as err:
        raise PreflightError(f"model: {err}") from err


def check_evaluator(spec: config_lib.Spec) -> None:
    """``eval.clip`` is there and its files are whole."""
    try:
        loading.check_clip(spec.evaluator_path)
    except loading.ModelLoadError as err:
        raise PreflightError(f"eval.clip={spec.config.eval.clip!r}: {err}") from err


def check_eval_sets(spec: config_lib.Spec) -> None:
    """Every name in ``eval.sets`` is one of the concept's sets (with several concepts: ``LABEL.SET``)."""
    available = [f"{label}.{s.name}" if label else s.name for label, part in spec.each() for s in part.concept.eval_sets]
    for name in (n.strip() for n in spec.config.eval.sets.split(";")):
        if name and name not in available:
            raise PreflightError(f"eval.sets names {name!r}, which the concept does not have; it has "
                                 f"{', '.join(available)}")
    for _, part in spec.each():
        for s in part.concept.eval_sets:
            if not s.prompts:
                raise PreflightError(f"evaluation set {s.name!r} has no prompts")


def check_devices(config: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
    """The global batch splits evenly over the devices, and the fsdp axis divides them."""
    n = jax.device_count() if n_devices is None else n_devices
    if config.train.batch_size % n:
        raise PreflightError(f"train.batch_size {config.train.batch_size} is not a multiple of the {n} devices; "
                             f"use a multiple of {n}")
    if config.train.batch_size % jax.process_count():
        raise PreflightError(f"train.batch_size {config.train.batch_size} is not a multiple of the "
                             f"{jax.process_count()} processes")
    if n % config.mesh.fsdp:
        raise PreflightError(f"mesh.fsdp={config.mesh.fsdp} does not divide the {n} devices")


def check_embedding_tokens(spec: config_lib.Spec) -> None:
    """The ``embedding`` group has a token of the target's own to train (read from the tokenizer alone)."""
    if spec.config.params != "embedding":
        return
    from ablate_jax import params as params_lib  # noqa: PLC0415

    try:
        tokenizer = loading.load_tokenizer(loading.resolve_path(spec.model_path) / "tokenizer")
    except loading.ModelLoadError as err:
        raise PreflightError(f"model: {err}") from err
    for concept in spec.concepts:
        if not params_lib.target_token_ids(tokenizer, concept.targets, concept.anchor):
            raise PreflightError(f"the target {concept.target!r} has no token of its own to train (all shared with "
                                 "the anchor); use another params group")


def check_run(spec: config_lib.Spec | ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              stages: Sequence[str] = STAGES, model_loaded: bool = False) -> Workdir:
    """Every check of ``stages`` (of :data:`STAGES`); raises :class:`PreflightError`, else returns the
    guarded workdir that the stages share.

    ``model_loaded``: the caller already holds the loaded pipeline, so its files need no check.
    """
    spec = config_lib.prepare(spec)
    config = spec.config
    check_workdir(workdir)
    if not model_loaded:
        check_model(spec)
    evaluates = "eval" in stages and config.eval.enabled
    memorization_filter = ("anchors" in stages and any(c.kind == "memorization" for c in spec.concepts)
                           and spec.family.copy_detector is None)
    if evaluates or memorization_filter:
        check_evaluator(spec)
    if evaluates:
        check_eval_sets(spec)
    if "train" in stages:
        check_devices(config)
    check_embedding_tokens(spec)
    try:
        return open_workdir(spec, workdir, stages)
    except WorkdirError as err:
        raise PreflightError(str(err)) from err


def write_resolved(spec: config_lib.Spec, workdir: str | os.PathLike) -> storage.AnyPath:
    """``WORKDIR/config.json``: the whole resolved config and, per resolved value, the rule that set it."""
    path = storage.path(workdir) / "config.json"
    record: dict[str, Any] = {
        "family": spec.family.name,
        "config": spec.config.to_dict(),
        "resolved": {k: {"value": v, "rule": why} for k, (v, why) in spec.notes.values.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    return path
