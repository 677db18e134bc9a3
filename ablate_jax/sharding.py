"""Device meshes and batch sharding shared by generation, training and evaluation.

Batches are sharded along the mesh's ``data`` axis; parameters are replicated unless an
``fsdp`` axis is present. Host-local arrays become global arrays here, so that the same code
runs on one CPU, one GPU and a multi-host TPU slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis (``data``) mesh over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA))


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
