"""Orbax checkpoints of a run's trainable state, verified on restore and guarded against mixing runs.

``workdir/checkpoints/`` holds an orbax ``CheckpointManager`` directory (per step: the train
state, i.e. trainable parameters, optimizer state and step; a small JSON with the data
position; and the state's checksums) and ``run.json``, the fingerprint of the config fields the
state depends on, which :mod:`ablate_jax.workdir` compares before anything runs. A checkpoint
whose restored values do not match the checksums written with them is refused as damaged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax import sharding, storage
from ablate_jax.concepts import Concept
from ablate_jax.models.loading import Pipeline
from ablate_jax.workdir import Workdir


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run."""


def checkpoints_dir(workdir: str | os.PathLike) -> storage.AnyPath:
    return storage.path(workdir) / "checkpoints"


def manager(workdir: str | os.PathLike, max_to_keep: int = 2, barrier_prefix: str | None = None
            ) -> ocp.CheckpointManager:
    """The run's checkpoint manager. ``barrier_prefix``: a name of its own for the managers of one
    process that save the same step at once (a sweep's runs): orbax's cross-process barriers are
    named after the step, and two saves of one step in flight would otherwise share them."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=barrier_prefix))
    return ocp.CheckpointManager(checkpoints_dir(workdir), options=options)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two wrapping uint32 sums of a leaf's bits: plain, and weighted by position.

    Integer sums are exact in any order, so the result does not depend on how the leaf is
    sharded or how XLA splits the reduction; a change of any one value changes the plain sum, and
    the weighted one sees values moved between positions.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    bits = bits.reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _checksums_fn(tree: Any) -> Any:
    return jax.tree.map(_leaf_checksum, tree)


def checksums(state: Any) -> dict[str, list[int]]:
    """Per leaf of ``state`` (by its path), the two sums of :func:`_leaf_checksum`."""
    sums = jax.tree_util.tree_flatten_with_path(_checksums_fn(state))[0]
    return {jax.tree_util.keystr(path): [int(v) for v in sharding.to_host(s)] for path, s in sums}


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_position: dict[str, int]) -> None:
    """Saves ``state``, the data position and the state's checksums as one checkpoint of ``step``."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position),
                                            checksum=ocp.args.JsonSave(checksums(state))),
              force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, int]]:
    """The state (laid out like ``abstract_state``, shardings included) and data position of a step.

    The restored values are checked against the checksums saved with them; a damaged or
    incomplete checkpoint raises :class:`CheckpointError` naming it and the way out.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    where = f"checkpoint {step} in {mngr.directory}"
    way_out = (f"delete {mngr.directory}/{step} to resume from the checkpoint before it, or start again with a new "
               "--workdir")
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                         data=ocp.args.JsonRestore(),
                                                         checksum=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds for one damaged file)
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointError(f"{where} cannot be restored ({type(e).__name__}: {reason[:200]}); {way_out}") from e
    saved = out["checksum"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} has no checksum; {way_out}")
    actual = checksums(out["state"])
    bad = sorted(k for k in set(saved) | set(actual) if saved.get(k) != actual.get(k))
    if bad:
        raise CheckpointError(f"{where} is damaged: {len(bad)} of its arrays do not match the checksums saved with "
                              f"them (first: {bad[0]}); {way_out}")
    return out["state"], dict(out["data"])


def abstract_state(tree: Any, shardings: Any) -> Any:
    """``tree``'s shapes and dtypes laid out by ``shardings`` (one sharding, or a tree matching
    ``tree``): the target :func:`restore` fills."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def selection_for(config: ml_collections.ConfigDict, pipeline: Pipeline,
                  concept: Concept | Sequence[Concept]) -> params_lib.Selection:
    """What the config's parameter group trains on this pipeline (for ``embedding``: the target tokens of
    the concept, or of every concept of a run of several)."""
    ids: list[int] = []
    if config.params == "embedding":
        ids = params_lib.target_token_ids_of(pipeline.tokenizer, concept)
    return params_lib.selection(pipeline.params, config.params, ids)


def restore_ablated_params(workdir: Workdir, pipeline: Pipeline,
                           selection: params_lib.Selection | None = None) -> dict[str, Any]:
    """The pipeline's parameters with the latest checkpoint's trainable leaves written in.

    ``workdir``: the run's guarded folder (:func:`ablate_jax.workdir.open_workdir`), whose spec
    says what was trained; ``selection``: the run's parameter selection, when already made.
    """
    if not checkpoints_dir(workdir.path).is_dir():
        raise CheckpointError(f"no checkpoint in {checkpoints_dir(workdir.path)}; train first")
    mngr = manager(workdir.path)
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {checkpoints_dir(workdir.path)}; train first")
    spec = workdir.spec
    sel = selection or selection_for(spec.config, pipeline, spec.concepts)
    trainable = sel.split(pipeline.params)
    # Replicated over every process's devices, then brought to the host: each process gets the
    # whole trained state, whatever layout (data parallel, fsdp) wrote it.
    abstract = abstract_state(jax.eval_shape(lambda: initial_state(trainable, optimizer_for(spec.config))),
                              sharding.replicated(sharding.make_mesh()))
    state, _ = restore(mngr, abstract, step)
    return sel.merge(pipeline.params, jax.tree.map(sharding.to_host, state["params"]))


def optimizer_for(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with the run's rate, decay and clipping."""
    t = (config if config_lib.is_resolved(config) else config_lib.resolve(config)).train
    return params_lib.optimizer(t.learning_rate, weight_decay=t.weight_decay, clip_norm=t.clip_norm)


def initial_state(trainable: dict[str, jax.Array], tx: Any) -> dict[str, Any]:
    """The train state: step, trainable parameters (a flat dict) and their optimizer state."""
    return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable)}
