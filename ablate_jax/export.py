"""Export an ablated model to PyTorch diffusers: a full pipeline folder and a small delta file.

    python -m ablate_jax.export --config=configs/xattn.py --workdir=DIR [--overwrite]

``workdir/export/`` holds:

- ``pipeline/``: a complete diffusers Stable Diffusion folder that
  ``diffusers.StableDiffusionPipeline.from_pretrained`` loads. Every file of the source model is
  copied byte for byte, except the weight files of the components the run trained (the UNet
  and/or the text encoder). Those are rewritten from the source files themselves: same file
  names, same tensor names (with or without ``text_model.``), shapes (a 1x1 convolution stays
  a convolution), dtypes and file metadata, with only the trained tensors replaced. Every tensor
  the run did not train is therefore bit-identical to the source model's. Other weight files of
  a trained component (an ``.fp16`` variant, pickles, Flax msgpack) would still hold the
  pretrained weights, so they are left out.
- ``delta.safetensors``: only what the run trained, under PyTorch names prefixed by the
  pipeline component (``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``,
  ``text_encoder.text_model.embeddings.token_embedding.weight``), in the shape and dtype of the
  source model's tensor. For the ``embedding`` group only the trained rows are stored:
  ``NAME@rows`` (``[k, hidden]``) and ``NAME@row_ids`` (int64 ``[k]``, the token ids); every
  other row of the matrix is the base model's. String metadata (see :data:`DELTA_MARKER`):
  ``base_model``, ``base_model_path``, ``base_manifest`` (for every tensor of every component
  the delta touches, not only the replaced ones: its dtype and the sha256 of its bytes),
  ``base_sha256`` (one hash over that manifest), ``params_group``, ``concept``, ``config_hash``,
  ``config`` and ``checkpoint_step``.
- ``export.json``: the checkpoint step, config hash and hashes above, used to recognise an
  export that is already done.

Everything is written into ``workdir/export.tmp-XXXX`` and renamed to ``workdir/export`` at
the end, so a crash never leaves a half-written export behind. An existing export of the same
run (config hash and checkpoint step, and trained values when they are passed in) is kept; one
of another run is replaced only with ``overwrite``.

Applying a delta: :func:`apply_delta` (JAX params) and :func:`apply_delta_torch` (a loaded
diffusers ``StableDiffusionPipeline``, in place). Both first check the whole base against the
manifest, so a delta is never applied to a base it was not computed from, even one that differs
only in a tensor the delta does not replace; a base held in a narrower dtype than the one the
delta was made from (a float16 pipeline for a float32 delta) is refused as such.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from etils import epath

from ablate_jax import checkpointing, cli, distributed, sharding, storage
from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax.models import loading
from ablate_jax.models.convert import ConversionError, flax_path_to_torch_key, flax_to_torch, torch_to_flax
from ablate_jax.workdir import EXPORT_RECORD, Workdir, open_workdir, recorded_hash

log = logging.getLogger("ablate_jax")

EXPORT_DIR = "export"
PIPELINE_DIR = "pipeline"
DELTA_FILE = "delta.safetensors"
RECORD_FILE = EXPORT_RECORD
DELTA_MARKER = "ablate_jax.delta"  # metadata key whose presence marks our delta files; value: format version
DELTA_VERSION = "2"
ROWS = "@rows"  # suffix of a delta tensor holding some rows of a base matrix ...
ROW_IDS = "@row_ids"  # ... and of the int64 tensor naming those rows

# Weight files that a trained component may carry besides the safetensors the loader reads; the
# export leaves them out since they would still hold the pretrained weights.
_OTHER_WEIGHT_SUFFIXES = loading.PICKLE_SUFFIXES + (".msgpack", ".h5", ".onnx", ".pb", ".gguf")


class ExportError(ValueError):
    """An export or a delta that cannot be written or applied; the message says why."""


# ------------------------------------------------------------------------------------------------ hashing


def tensor_sha256(value: np.ndarray) -> str:
    """sha256 of a tensor's shape and raw little-endian C-order bytes.

    The bytes are those of the dtype the delta stores, so the same tensor hashes the same in
    NumPy, JAX and PyTorch.
    """
    value = np.require(value, requirements="C")
    h = hashlib.sha256(("shape=" + ",".join(str(d) for d in value.shape) + ";").encode())
    h.update(value.tobytes())
    return h.hexdigest()


def combined_sha256(per_tensor: Mapping[str, str]) -> str:
    """One hash over named tensor hashes, independent of their order."""
    h = hashlib.sha256()
    for name in sorted(per_tensor):
        h.update(f"{name}:{per_tensor[name]}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ safetensors I/O


def _read_metadata(path: epath.Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header only (works on gs:// too)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return dict(header.get("__metadata__") or {})


def _read_tensors(path: epath.Path) -> dict[str, np.ndarray]:
    if os.fspath(path).startswith("gs://"):
        return safetensors.numpy.load(path.read_bytes())
    return safetensors.numpy.load_file(os.fspath(path))


def read_delta(delta_path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a delta file; refuses a file that is not an ablate_jax delta."""
    path = epath.Path(delta_path)
    if not path.exists():
        raise ExportError(f"delta file {path} does not exist")
    try:
        meta = _read_metadata(path)
        tensors = _read_tensors(path)
    except Exception as e:  # noqa: BLE001  (any unreadable file is reported the same way)
        raise ExportError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get(DELTA_MARKER) != DELTA_VERSION:
        raise ExportError(f"{path} is not an ablate_jax delta (no {DELTA_MARKER}={DELTA_VERSION} in its metadata)")
    for name in tensors:
        if name.endswith(ROWS) and name[: -len(ROWS)] + ROW_IDS not in tensors:
            raise ExportError(f"{path}: {name} has no {name[: -len(ROWS)] + ROW_IDS}")
    return tensors, meta


def _entries(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, str, np.ndarray, np.ndarray | None]]:
    """(component, name in the component, value, row ids or None) for each replaced tensor of a delta."""
    out = []
    for key in sorted(tensors):
        if key.endswith(ROW_IDS):
            continue
        rows = None
        full = key
        if key.endswith(ROWS):
            full = key[: -len(ROWS)]
            rows = np.asarray(tensors[full + ROW_IDS], np.int64)
        if "." not in full:
            raise ExportError(f"delta tensor {key!r} does not start with a pipeline component (unet., text_encoder.)")
        component, name = full.split(".", 1)
        out.append((component, name, np.asarray(tensors[key]), rows))
    return out


def identity_name(component: str, name: str) -> str:
    """``component.name`` with the text encoder's optional ``text_model.`` level dropped (files differ in it)."""
    if component == "text_encoder" and name.startswith("text_model."):
        name = name[len("text_model."):]
    return f"{component}.{name}"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def manifest_entry(value: np.ndarray) -> str:
    """``dtype:sha256`` of a tensor's raw C-order bytes (its shape is left out: a 1x1 convolution and
    the same kernel held as a matrix have the same bytes)."""
    value = np.require(value, requirements="C")
    return f"{_dtype_name(value.dtype)}:{hashlib.sha256(value.tobytes()).hexdigest()}"


def _manifest(meta: Mapping[str, str]) -> dict[str, str]:
    try:
        manifest = json.loads(meta["base_manifest"])
    except (KeyError, ValueError) as e:
        raise ExportError("the delta has no readable base_manifest in its metadata") from e
    if not isinstance(manifest, dict) or not manifest:
        raise ExportError("the delta's base_manifest is empty")
    return manifest


def _check_identity(manifest: Mapping[str, str], base: Mapping[str, Any], as_numpy: Any, meta: Mapping[str, str]) -> None:
    """Checks ``base`` (identity name -> tensor) against the manifest: every tensor there, in a dtype that
    holds the recorded one, with the recorded bytes. ``as_numpy(tensor, dtype_name)`` casts to that dtype."""
    missing = [name for name in manifest if name not in base]
    if missing:
        raise ExportError(f"the base has no tensor {missing[0]}, which the delta's base has "
                          f"({len(missing)} missing); the delta was made for another model ({meta.get('base_model', '?')})")
    for name, entry in manifest.items():
        want = entry.split(":", 1)[0]
        have = _dtype_name(base[name].dtype)
        if have != want and np.dtype(have).itemsize <= np.dtype(want).itemsize:
            component = name.split(".", 1)[0]
            raise ExportError(f"the base's {component} is held in {have} but the delta was made from {want} weights "
                              f"({name}); load the base in {want} (torch_dtype=torch.{want}) and apply it there")
    for name, entry in sorted(manifest.items()):
        want = entry.split(":", 1)[0]
        if manifest_entry(as_numpy(base[name], want)) != entry:
            raise ExportError(
                f"the delta was made for another base model: {name} differs from the base it was made from "
                f"(delta base: {meta.get('base_model', '?')}); pass base_identity_check=False to apply it anyway"
            )


# ------------------------------------------------------------------------------------------------ applying deltas


def apply_delta(params: Mapping[str, Any], delta_path: str | os.PathLike, *,
                base_identity_check: bool = True) -> dict[str, Any]:
    """``params`` (a pipeline tree ``{"unet", "vae", "text_encoder"}``) with a delta written in.

    Refuses with :class:`ExportError` (before changing anything) when any tensor of a component
    the delta touches differs from the base the delta was made from, unless
    ``base_identity_check`` is False. The leaves the delta does not touch are returned as they
    are; ``params`` is not modified.
    """
    tensors, meta = read_delta(delta_path)
    if base_identity_check:
        manifest = _manifest(meta)
        components = {name.split(".", 1)[0] for name in manifest}
        base = {identity_name(c, k): v for c in sorted(components) if c in params
                for k, v in flax_to_torch(params[c]).items()}
        _check_identity(manifest, base, lambda v, dtype: np.asarray(v).astype(np.dtype(dtype)), meta)
    flat = params_lib.flatten(params)
    by_torch_name = {}
    for path in flat:
        component, rest = path.split("/", 1)
        by_torch_name[f"{component}.{flax_path_to_torch_key(tuple(rest.split('/')))}"] = path
    updates: dict[str, np.ndarray] = {}
    for component, name, value, rows in _entries(tensors):
        full = f"{component}.{name}"
        path = by_torch_name.get(full)
        if path is None:
            raise ExportError(f"the delta's tensor {full} has no parameter in these params")
        leaf = np.asarray(jax.device_get(flat[path]))
        rel = path.split("/", 1)[1]
        # The base in the delta's layout: PyTorch orientation, the delta's shape and dtype.
        (base_torch,) = flax_to_torch(params_lib.unflatten({rel: leaf})).values()
        if rows is not None:
            base_torch = base_torch[rows]
        if base_torch.size != value.size:
            raise ExportError(f"{full}: the delta's shape {value.shape} does not fit the parameter's {base_torch.shape}")
        if rows is not None:
            new = leaf.copy()
            new[rows] = value.astype(leaf.dtype)
        else:
            torch_name = flax_path_to_torch_key(tuple(rel.split("/")))
            abstract = params_lib.unflatten({rel: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)})
            try:
                (new,) = params_lib.flatten(torch_to_flax({torch_name: value}, abstract, what=component)).values()
            except ConversionError as e:
                raise ExportError(str(e)) from e
        updates[path] = new
    # Written only after every tensor passed its check: a refused delta changes nothing.
    for path, new in updates.items():
        flat[path] = jnp.asarray(new)
    return params_lib.unflatten(flat)


def apply_delta_torch(pipe: Any, delta_path: str | os.PathLike, *, base_identity_check: bool = True) -> Any:
    """Writes a delta into a loaded diffusers pipeline (``pipe.unet``, ``pipe.text_encoder``) in place.

    The same base check as :func:`apply_delta` (on the components' ``state_dict``); nothing is
    changed when it fails. Returns ``pipe``.
    """
    import torch  # noqa: PLC0415  (torch is needed only on the PyTorch side)

    tensors, meta = read_delta(delta_path)
    if base_identity_check:
        manifest = _manifest(meta)
        base: dict[str, Any] = {}
        for component in sorted({name.split(".", 1)[0] for name in manifest}):
            module = getattr(pipe, component, None)
            if module is None or not isinstance(module, torch.nn.Module):
                raise ExportError(f"the pipeline has no component {component!r}, which the delta changes")
            base.update({identity_name(component, k): v.detach() for k, v in module.state_dict().items()})

        def as_numpy(t: Any, dtype: str) -> np.ndarray:
            t = t.to("cpu").to(getattr(torch, dtype)).contiguous()
            return _torch_bytes_view(t, np.dtype(dtype))

        _check_identity(manifest, base, as_numpy, meta)
    plan = []
    for component, name, value, rows in _entries(tensors):
        module = getattr(pipe, component, None)
        if module is None or not isinstance(module, torch.nn.Module):
            raise ExportError(f"the pipeline has no component {component!r} for the delta's tensor {component}.{name}")
        named = dict(module.named_parameters())
        # transformers >= 5 names CLIPTextModel's parameters without the "text_model." level.
        candidates = [name] + ([name.split(".", 1)[1]] if "." in name else [])
        param = next((named[c] for c in candidates if c in named), None)
        if param is None:
            raise ExportError(f"{component} has no parameter {name}")
        base = param.detach().to("cpu")
        if rows is not None:
            base = base[torch.from_numpy(rows)]
        if base.numel() != value.size:
            raise ExportError(f"{component}.{name}: the delta's shape {value.shape} does not fit {tuple(base.shape)}")
        plan.append((param, torch.from_numpy(value.copy()), rows))
    with torch.no_grad():
        for param, value, rows in plan:
            value = value.to(device=param.device, dtype=param.dtype)
            if rows is not None:
                param[torch.from_numpy(rows).to(param.device)] = value.reshape(len(rows), *param.shape[1:])
            else:
                param.copy_(value.reshape(param.shape))
    return pipe


def _torch_bytes_view(t: Any, dtype: np.dtype) -> np.ndarray:
    """A CPU torch tensor as a NumPy array of ``dtype`` sharing its bytes (bfloat16 has no NumPy twin)."""
    import torch  # noqa: PLC0415

    raw = t.reshape(-1).view(torch.uint8).numpy()
    return raw.view(dtype).reshape(tuple(t.shape))


# ------------------------------------------------------------------------------------------------ export


def _checkpoint_step(workdir: Path) -> int | None:
    """The latest checkpoint step of the workdir, or None without checkpoints (no folder is created)."""
    folder = checkpointing.checkpoints_dir(workdir)
    if not folder.is_dir():
        return None
    mngr = checkpointing.manager(workdir)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def _trained_values(selection: params_lib.Selection, ablated: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The trained leaves (or rows) of ``ablated``, by flat path, on the host."""
    return {k: sharding.to_host(v) for k, v in selection.split(ablated).items()}


def _trained_sha256(values: Mapping[str, np.ndarray]) -> str:
    return combined_sha256({k: tensor_sha256(v) for k, v in values.items()})


def _source_key(name: str, available: set[str], component: str) -> str:
    """The name a tensor has in the source files (transformers >= 5 drops ``text_model.``)."""
    if name in available:
        return name
    tail = name.split(".", 1)[1] if "." in name else name
    if tail in available:
        return tail
    raise ExportError(f"the source model's {component}/ has no tensor {name}")


def _weight_index(folder: epath.Path) -> str | None:
    # The same choice as loading._weight_files: the first (sorted) safetensors index, if any.
    names = sorted(f.name for f in folder.iterdir() if f.name.endswith(".safetensors.index.json"))
    return names[0] if names else None


def _copy_file(src: epath.Path, dst: Path) -> None:
    if os.fspath(src).startswith("gs://"):
        dst.write_bytes(src.read_bytes())
    else:
        shutil.copyfile(os.fspath(src), dst)  # follows symlinks (hub snapshots link into blobs/)


def _copy_tree(src: epath.Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name.startswith("."):  # .cache / .gitattributes of hub snapshots: not part of the model
            continue
        if entry.is_dir():
            _copy_tree(entry, dst / entry.name)
        else:
            _copy_file(entry, dst / entry.name)


def _write_component(src: epath.Path, dst: Path, trained: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                     delta: dict[str, np.ndarray], manifest: dict[str, str], component: str) -> None:
    """Rewrites one trained component from its source files, replacing the trained tensors.

    ``trained``: canonical PyTorch name (within the component) -> (value in PyTorch layout,
    row ids or None). Fills ``delta`` with the delta's tensors (under ``component.name``) and
    ``manifest`` with an entry for every tensor of the source component (:func:`manifest_entry`).
    """
    weight_files = loading._weight_files(src)  # noqa: SLF001  (the exact files the loader read)
    index = _weight_index(src)
    keep = {f.name for f in weight_files} | ({index} if index else set())
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name in keep or entry.name.startswith("."):
            continue
        if ".safetensors" in entry.name or entry.name.endswith(_OTHER_WEIGHT_SUFFIXES):
            log.warning("export: leaving out %s/%s (it would still hold the pretrained weights)", component,
                        entry.name)
            continue
        if entry.is_dir():
            _copy_tree(entry, dst / entry.name)
        else:
            _copy_file(entry, dst / entry.name)
    if index:
        _copy_file(src / index, dst / index)  # same tensor names, shapes and dtypes: the index stays valid

    remaining = dict(trained)
    for f in weight_files:
        tensors = _read_tensors(f)
        for key, value in tensors.items():
            manifest[identity_name(component, key)] = manifest_entry(value)
        available = set(tensors)
        changed = False
        for name in list(remaining):
            try:
                key = _source_key(name, available, component)
            except ExportError:
                continue
            value, rows = remaining.pop(name)
            base = tensors[key]
            delta_name = f"{component}.{name}"
            if rows is not None:
                new_rows = value.astype(base.dtype)
                if new_rows.shape != (len(rows), *base.shape[1:]):
                    raise ExportError(f"{component}.{name}: trained rows {new_rows.shape} do not fit {base.shape}")
                delta[delta_name + ROWS] = new_rows
                delta[delta_name + ROW_IDS] = rows.astype(np.int64)
                merged = base.copy()
                merged[rows] = new_rows
                tensors[key] = merged
            else:
                if value.size != base.size:
                    raise ExportError(f"{component}.{name}: trained shape {value.shape} does not fit {base.shape}")
                # The source's shape and dtype: a 1x1 convolution trained as a dense kernel stays 4-d.
                new = np.require(value.reshape(base.shape).astype(base.dtype), requirements="C")
                delta[delta_name] = new
                tensors[key] = new
            changed = True
        if changed:
            safetensors.numpy.save_file(tensors, dst / f.name, metadata=_read_metadata(f) or None)
        else:
            _copy_file(f, dst / f.name)
    if remaining:
        raise ExportError(f"the source model's {component}/ has no tensor {sorted(remaining)[0]}")


def export_run(spec: config_lib.Spec | ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir, *,
               pipeline: loading.Pipeline | None = None, ablated_params: Mapping[str, Any] | None = None,
               selection: params_lib.Selection | None = None, overwrite: bool = False) -> Path:
    """Writes ``workdir/export/`` (pipeline folder, delta, export.json) and returns its path.

    ``spec``: the run (a config is prepared first). ``ablated_params`` defaults to the latest
    checkpoint's (:func:`checkpointing.restore_ablated_params`); ``selection`` to the spec's
    parameter group on ``pipeline``. The recorded checkpoint step is the workdir's latest, or None
    when the params are passed in and the workdir has no checkpoint. An existing export of the
    same run is returned unchanged; one of another run raises :class:`ExportError` unless
    ``overwrite`` (or ``config.export.overwrite``).
    """
    wd = open_workdir(spec, workdir, ("eval",))  # checkpoints of another run are refused here
    spec, config, root = wd.spec, wd.spec.config, wd.path
    final = root / EXPORT_DIR
    overwrite = overwrite or bool(config.export.overwrite)
    fingerprint = wd.train_identity
    step = _checkpoint_step(root)
    if ablated_params is None and step is None:
        raise ExportError(f"no checkpoint in {checkpointing.checkpoints_dir(root)}; train first")

    existing = wd.export_record() if final.exists() else None
    if ablated_params is None and final.exists():
        # The checkpoint alone identifies the run: decide before loading or restoring anything.
        if existing is not None and _same_run(existing, fingerprint["hash"], step, None):
            log.info("already exported: %s (step %s, config %s)", final, step, fingerprint["hash"])
            return final
        if not overwrite:
            raise ExportError(str(wd.export_refusal(existing, step)))

    if pipeline is None:
        pipeline = loading.load_pipeline(spec.model_path)
    selection = selection or checkpointing.selection_for(config, pipeline, spec.concepts)
    if ablated_params is None:
        ablated_params = checkpointing.restore_ablated_params(wd, pipeline, selection)
    trained = _trained_values(selection, ablated_params)
    bad = next((k for k, v in sorted(trained.items()) if not np.all(np.isfinite(np.asarray(v, np.float32)))), None)
    if bad is not None:
        where = f"the checkpoint at step {step}" if step is not None else "the trained parameters"
        raise ExportError(f"{where} holds NaN or infinite values ({bad}); it cannot be exported. Train again with "
                          "a lower train.learning_rate in a new --workdir")
    trained_hash = _trained_sha256(trained)
    if existing is not None and _same_run(existing, fingerprint["hash"], step, trained_hash):
        log.info("already exported: %s (step %s, config %s)", final, step, fingerprint["hash"])
        return final
    if final.exists() and not overwrite:
        raise ExportError(str(wd.export_refusal(existing, step)))

    # One writer; the other processes only took part in gathering the trained values, and wait
    # (even when the writer fails) so that none returns before the export is in place.
    try:
        if jax.process_index() == 0:
            if not storage.is_remote(root):
                _remove_leftovers(root)
            # Built in a local folder, then put in place whole: a rename locally; on a bucket an
            # upload with export.json last, whose presence marks the export complete.
            with storage.staging(root, EXPORT_DIR + ".tmp-") as tmp:
                record = _write_export(tmp, config, pipeline, selection, spec.concepts, trained, fingerprint, step,
                                       trained_hash)
                _make_readable(tmp)
                storage.replace_dir(tmp, final, last=RECORD_FILE)
            log.info("exported %s (%d tensors in the delta, components replaced: %s)", final,
                     record["delta"]["tensors"], ", ".join(record["components_replaced"]))
    finally:
        distributed.barrier("ablate_jax_export")
    return final


def _same_run(record: Mapping[str, Any], config_hash: str, step: int | None, trained_hash: str | None) -> bool:
    same = recorded_hash(record, "config", "config_hash") == config_hash and record.get("checkpoint_step") == step
    if trained_hash is not None:
        same = same and record.get("delta", {}).get("trained_sha256") == trained_hash
    return same



def _remove_leftovers(workdir: Path) -> None:
    """Temporary folders of an export that was killed before its rename."""
    for p in workdir.glob(EXPORT_DIR + ".*-*"):
        if re.fullmatch(re.escape(EXPORT_DIR) + r"\.(tmp|old)-.+", p.name) and p.is_dir():
            log.info("removing %s, left by an interrupted export", p)
            shutil.rmtree(p, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """The modes of ordinary files and folders: mkdtemp (and safetensors) create owner-only ones."""
    umask = storage.umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def _write_export(out: Path, config: ml_collections.ConfigDict, pipeline: loading.Pipeline,
                  selection: params_lib.Selection, removed: Sequence[Any], trained: Mapping[str, np.ndarray],
                  fingerprint: Mapping[str, Any], step: int | None, trained_hash: str) -> dict[str, Any]:
    source = loading.resolve_path(pipeline.path)
    # Canonical PyTorch names of the trained tensors, grouped by component.
    by_component: dict[str, dict[str, tuple[np.ndarray, np.ndarray | None]]] = {}
    for key, value in trained.items():
        rows = None
        path = key
        if key.endswith(params_lib.ROWS_SUFFIX):
            path = key[: -len(params_lib.ROWS_SUFFIX)]
            rows = np.asarray(selection.rows, np.int64)
        component, rel = path.split("/", 1)
        rel_tuple = tuple(rel.split("/"))
        if rows is None:
            (torch_value,) = flax_to_torch(params_lib.unflatten({rel: value})).values()
        else:
            torch_value = value  # embedding rows: the same layout in both frameworks
        by_component.setdefault(component, {})[flax_path_to_torch_key(rel_tuple)] = (torch_value, rows)

    pipe_dir = out / PIPELINE_DIR
    pipe_dir.mkdir()
    delta: dict[str, np.ndarray] = {}
    manifest: dict[str, str] = {}
    for entry in source.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.name in by_component:
            _write_component(entry, pipe_dir / entry.name, by_component[entry.name], delta, manifest, entry.name)
        elif entry.is_dir():
            _copy_tree(entry, pipe_dir / entry.name)
        else:
            _copy_file(entry, pipe_dir / entry.name)
    missing = set(by_component) - {p.name for p in pipe_dir.iterdir()}
    if missing:
        raise ExportError(f"the source model {source} has no component folder {sorted(missing)[0]}/")

    infos = [{"kind": c.kind, "targets": list(c.targets), "anchor": c.anchor} for c in removed]
    # One concept: its fields; several (one delta removes them all): the list of them.
    concept_info: dict[str, Any] = infos[0] if len(infos) == 1 else {"concepts": infos}
    if selection.rows:
        concept_info["token_ids"] = list(selection.rows)
    meta = {
        "format": "pt",
        DELTA_MARKER: DELTA_VERSION,
        "base_model": str(config.model),
        "base_model_path": os.fspath(source),
        "base_sha256": combined_sha256(manifest),
        "base_manifest": json.dumps(manifest, sort_keys=True),
        "params_group": selection.group,
        "concept": json.dumps(concept_info, sort_keys=True),
        "config_hash": fingerprint["hash"],
        "config": json.dumps(fingerprint["fields"], sort_keys=True, default=str),
        "checkpoint_step": "null" if step is None else str(step),
    }
    safetensors.numpy.save_file(delta, out / DELTA_FILE, metadata=meta)
    record = {
        "config_hash": fingerprint["hash"],
        "checkpoint_step": step,
        "params_group": selection.group,
        "concept": concept_info,
        "base_model": str(config.model),
        "base_model_path": os.fspath(source),
        "components_replaced": sorted(by_component),
        "delta": {"file": DELTA_FILE, "tensors": len([k for k in delta if not k.endswith(ROW_IDS)]),
                  "base_sha256": meta["base_sha256"], "trained_sha256": trained_hash},
        "config": fingerprint["fields"],
    }
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    return record


# ------------------------------------------------------------------------------------------------ command line


def _parse(argv: list[str]) -> tuple[ml_collections.ConfigDict, str, bool]:
    from absl import flags  # noqa: PLC0415

    fv = cli.flag_values(argv, "the run's folder; the export goes to WORKDIR/export/")
    flags.DEFINE_bool("overwrite", False, "replace an existing export of another run", flag_values=fv)
    config, workdir = cli.parse(fv, argv, ExportError)
    return config, workdir, fv.overwrite


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ablate_jax.export --config=... --workdir=... [--overwrite]``; returns the exit status."""
    from ablate_jax.concepts import ConceptError  # noqa: PLC0415

    cli.configure_logging()
    errors = (ExportError, ConceptError, config_lib.ConfigError, loading.ModelLoadError, checkpointing.CheckpointError,
              params_lib.ParamsError, ValueError, OSError)
    try:
        config, workdir, overwrite = _parse(list(sys.argv if argv is None else argv))
        from ablate_jax import preflight  # noqa: PLC0415

        if overwrite:
            config_lib.override(config, "export.overwrite", "true")
        spec = config_lib.prepare(config)
        wd = preflight.check_run(spec, workdir, stages=("export",))
        path = export_run(spec, wd, overwrite=overwrite)
    except errors as err:
        print(f"error: {cli.one_line(err)}", file=sys.stderr)
        return 1
    print(f"exported {path}: {PIPELINE_DIR}/ (diffusers), {DELTA_FILE}, {RECORD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
