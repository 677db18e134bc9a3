"""Orbax checkpoints of a run's trainable state, guarded against mixing runs in one workdir.

``workdir/checkpoints/`` holds an orbax ``CheckpointManager`` directory (per step: the train
state, i.e. trainable parameters, optimizer state and step, plus a small JSON with the data
position) and ``run.json``, the fingerprint of the config fields the state depends on. A
workdir whose fingerprint differs from the config is refused instead of resumed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax import sharding, storage
from ablate_jax.concepts import Concept
from ablate_jax.models.loading import Pipeline

TRAIN_KEYS = config_lib.ANCHOR_KEYS + (
    "dtype", "params", "loss", "teacher", "prior_weight", "preserve", "stop_sot_kv_grad",
    "train.batch_size", "train.learning_rate", "train.weight_decay", "train.clip_norm", "train.flip", "train.rescale",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run."""


def checkpoints_dir(workdir: str | os.PathLike) -> storage.AnyPath:
    return storage.path(workdir) / "checkpoints"


def check_fingerprint(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, write: bool) -> None:
    """Refuses a workdir whose checkpoints came from another model or config; records ours if ``write``."""
    path = checkpoints_dir(workdir) / "run.json"
    ours = config_lib.fingerprint(config, *TRAIN_KEYS)
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs["hash"] != ours["hash"]:
            diff = sorted(k for k in ours["fields"] if theirs["fields"].get(k) != ours["fields"][k])
            raise CheckpointError(
                f"{checkpoints_dir(workdir)} holds checkpoints of another run (differs in {', '.join(diff) or 'fields'}); "
                "use a new --workdir"
            )
    elif write and jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_text(path, json.dumps(ours, indent=1, sort_keys=True))


def manager(workdir: str | os.PathLike, max_to_keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(checkpoints_dir(workdir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_position: dict[str, int]) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
              force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, int]]:
    """The state (laid out like ``abstract_state``, shardings included) and data position of a step."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                         data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"checkpoint {step} in {mngr.directory} cannot be restored: {e}") from e
    return out["state"], dict(out["data"])


def abstract_state(tree: Any, shardings: Any) -> Any:
    """``tree``'s shapes and dtypes laid out by ``shardings`` (one sharding, or a tree matching
    ``tree``): the target :func:`restore` fills."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def selection_for(config: ml_collections.ConfigDict, pipeline: Pipeline, concept: Concept) -> params_lib.Selection:
    """What the config's parameter group trains on this pipeline."""
    ids: list[int] = []
    if config.params == "embedding":
        ids = params_lib.target_token_ids(pipeline.tokenizer, concept.targets, concept.anchor)
    return params_lib.selection(pipeline.params, config.params, ids)


def restore_ablated_params(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                           pipeline: Pipeline) -> dict[str, Any]:
    """The pipeline's parameters with the latest checkpoint's trainable leaves written in."""
    check_fingerprint(config, workdir, write=False)
    if not checkpoints_dir(workdir).is_dir():
        raise CheckpointError(f"no checkpoint in {checkpoints_dir(workdir)}; train first")
    mngr = manager(workdir)
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {checkpoints_dir(workdir)}; train first")
    concept = config_lib.concept_from_config(config)
    sel = selection_for(config, pipeline, concept)
    trainable = sel.split(pipeline.params)
    # Replicated over every process's devices, then brought to the host: each process gets the
    # whole trained state, whatever layout (data parallel, fsdp) wrote it.
    abstract = abstract_state(jax.eval_shape(lambda: initial_state(trainable, optimizer_for(config))),
                              sharding.replicated(sharding.make_mesh()))
    state, _ = restore(mngr, abstract, step)
    return sel.merge(pipeline.params, jax.tree.map(sharding.to_host, state["params"]))


def optimizer_for(config: ml_collections.ConfigDict):
    t = config.train
    return params_lib.optimizer(t.learning_rate, weight_decay=t.weight_decay, clip_norm=t.clip_norm)


def initial_state(trainable: dict[str, jax.Array], tx: Any) -> dict[str, Any]:
    """The train state: step, trainable parameters (a flat dict) and their optimizer state."""
    return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable)}
