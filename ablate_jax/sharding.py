"""Device meshes, shardings and host <-> device transfers shared by generation, training and evaluation.

A run's mesh has two axes: ``data`` and ``fsdp``. Batches are split over both (every device
holds different examples); parameters are replicated, or with ``fsdp`` > 1 split along that
axis (fully sharded data parallel), which is how a full fine-tune of a large UNet fits. A
sweep's mesh is ``(runs, data)``: stacked per-run states split over ``runs``, batches over
``data`` (docs/design.md, "Sweeps"). The
helpers here turn host values into global arrays and back, so the same code runs on one CPU,
one GPU and every host of a multi-host TPU slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
FSDP = "fsdp"
RUNS = "runs"  # a sweep's mesh: (runs, data), one group of devices per slice of the runs

# Leaves smaller than this stay replicated under FSDP: splitting a bias or a norm scale saves
# nothing and costs a gather.
FSDP_MIN_SIZE = 1024


def make_mesh(devices: Sequence[jax.Device] | None = None, *, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over all (or the given) devices; ``fsdp`` devices share each parameter."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"the fsdp axis ({fsdp}) must divide the {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), (DATA, FSDP))


def make_run_mesh(runs: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A sweep's ``(runs, data)`` mesh: ``runs`` groups of devices, each training its share of the runs
    on its own slice of every batch (docs/sweeps.md, "On a pod slice")."""
    devices = list(jax.devices() if devices is None else devices)
    if runs < 1 or len(devices) % runs:
        raise ValueError(f"the runs axis ({runs}) must divide the {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(runs, len(devices) // runs), (RUNS, DATA))


def run_stacked(mesh: Mesh) -> NamedSharding:
    """Leading (run) axis split over the ``runs`` axis; the rest whole (each run's tree on its devices)."""
    return NamedSharding(mesh, PartitionSpec(RUNS))


def run_batch_sharded(mesh: Mesh, stacked: bool) -> NamedSharding:
    """A sweep's batch: ``[runs, batch, ...]`` split over both axes, or one batch every run shares
    (``[batch, ...]``, split over ``data`` and repeated on every group of the ``runs`` axis)."""
    return NamedSharding(mesh, PartitionSpec(RUNS, DATA) if stacked else PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def fsdp_size(mesh: Mesh) -> int:
    return int(mesh.shape.get(FSDP, 1))


def param_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """How a parameter (or its optimizer moment) of ``shape`` is laid out.

    Replicated without an ``fsdp`` axis; otherwise split along its largest dimension that the
    axis divides (leaves below :data:`FSDP_MIN_SIZE` elements, or with no such dimension, stay
    replicated). The rule depends on the shape alone, so AdamW's moments land where their
    parameter is.
    """
    n = fsdp_size(mesh)
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return replicated(mesh)
    candidates = [i for i, d in enumerate(shape) if d % n == 0]
    if not candidates:
        return replicated(mesh)
    axis = max(candidates, key=lambda i: (shape[i], -i))
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """:func:`param_sharding` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``)."""
    return jax.tree.map(lambda x: param_sharding(mesh, np.shape(x)), tree)


def put(tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) as global arrays laid out by ``shardings``.

    ``shardings`` is one sharding or a tree of them matching ``tree``. Arrays already laid out
    that way pass through untouched.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if s.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, s)  # onto this process's devices, or a global array changing layout
        host = np.asarray(x)
        # Each process supplies the slices its own devices hold, cut from its full copy.
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def to_host(x: Any) -> np.ndarray:
    """A (possibly multi-host) array as one NumPy array on this host."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to ``size`` by repeating the last row (padded rows are discarded later)."""
    if x.shape[0] == size:
        return x
    if x.shape[0] == 0 or x.shape[0] > size:
        raise ValueError(f"cannot pad a batch of {x.shape[0]} to {size}")
    reps = np.repeat(x[-1:], size - x.shape[0], axis=0)
    return np.concatenate([x, reps], axis=0)
