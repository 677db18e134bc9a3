"""Fully sharded data parallelism (``mesh.fsdp``) against plain data parallelism on 8 devices."""

import jax
import numpy as np
import optax

from ablate_jax import checkpointing, losses, sharding, text_to_image, train
from ablate_jax import params as params_lib


def test_fsdp_matches_data_parallel(toy_pipe, tmp_path):
    # A full fine-tune, the case fsdp is for, on the toy model. Plain SGD makes the update the
    # gradient itself, so the comparison is not blown up by Adam's division by tiny second moments.
    pipe = toy_pipe
    sel = params_lib.selection(pipe.params, "full")
    loss_cfg = losses.LossConfig(loss="model_based", teacher="frozen", prior_weight=1.0)
    tx = optax.apply_if_finite(optax.sgd(0.5), max_consecutive_errors=1)  # the wrapper the train step reads
    rng = np.random.default_rng(0)
    size, lat = 32, 32 // pipe.vae_downsample
    batches = [{"image": rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float32),
                "mask": np.ones((8, lat, lat, 1), np.float32),
                "target_ids": text_to_image.tokenize(pipe, ["a red smiley on a white background"] * 8),
                "anchor_ids": text_to_image.tokenize(pipe, ["a red circle on a white background"] * 8)}
               for _ in range(2)]
    runs = {}
    for fsdp in (1, 4):
        mesh = sharding.make_mesh(fsdp=fsdp)
        state_sh, base_sh = train.state_shardings(pipe, sel, tx, mesh)
        step = jax.jit(train.make_train_step(pipe, sel, loss_cfg, tx, seed=0),
                       in_shardings=(state_sh, base_sh, sharding.batch_sharded(mesh)),
                       out_shardings=(state_sh, sharding.replicated(mesh)))
        state = sharding.put(checkpointing.initial_state(sel.split(pipe.params), tx), state_sh)
        base = sharding.put(pipe.params, base_sh)
        history = []
        for batch in batches:
            state, metrics = step(state, base, sharding.put(batch, sharding.batch_sharded(mesh)))
            history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        runs[fsdp] = (mesh, state, state_sh, base_sh, history)

    np.testing.assert_allclose(runs[4][4], runs[1][4], rtol=1e-5)
    start = sel.split(pipe.params)
    dp, fs = runs[1][1]["params"], runs[4][1]["params"]
    sq_diff = sq_change = 0.0
    for k in dp:
        p = sharding.to_host(dp[k])
        change, diff = (p - np.asarray(start[k])).astype(np.float64), (sharding.to_host(fs[k]) - p).astype(np.float64)
        sq_diff, sq_change = sq_diff + np.sum(diff**2), sq_change + np.sum(change**2)
        # Relative to the change, or a couple of float32 ulps of the parameter: norm scales near 1
        # (ulp 1.2e-7) move little in two steps, so one rounding step is a large part of that.
        ulps = np.linalg.norm(np.spacing(np.abs(p)).astype(np.float64))
        assert np.linalg.norm(diff) <= 2e-4 * np.linalg.norm(change) + 2 * ulps, k
    assert (sq_diff / sq_change) ** 0.5 <= 1e-4, (sq_diff / sq_change) ** 0.5

    # The layout really is split: most UNet scalars live on one fsdp shard of four, in the base and the train state.
    mesh, state, state_sh, base_sh, _ = runs[4]
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    leaves = jax.tree.leaves(pipe.params["unet"])
    split = sum(x.size for x, s in zip(leaves, jax.tree.leaves(base_sh["unet"], is_leaf=is_sharding), strict=True)
                if sharding.FSDP in s.spec)
    assert split >= 0.9 * sum(x.size for x in leaves)
    big = max(jax.tree.leaves(state["params"]), key=lambda x: x.size)
    assert big.addressable_shards[0].data.size * 4 == big.size

    # An fsdp-sharded state goes through an orbax checkpoint and comes back in the same layout.
    mngr = checkpointing.manager(tmp_path / "ckpt")
    checkpointing.save(mngr, 2, state, {"step": 2})
    mngr.wait_until_finished()
    restored, position = checkpointing.restore(mngr, checkpointing.abstract_state(state, state_sh))
    assert position == {"step": 2}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(sharding.to_host(a), sharding.to_host(b))
