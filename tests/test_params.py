"""Parameter groups, the trainable/frozen split and the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ablate_jax import params as P
from ablate_jax.models import load_pipeline
from ablate_jax.toy import shipped_path


@pytest.fixture(scope="module")
def toy():
    return load_pipeline(shipped_path("pipeline"))


def test_groups_select_the_documented_leaves(toy):
    kv = P.select(toy.params, "xattn_kv")
    assert kv and all("/attn2/to_k/" in p or "/attn2/to_v/" in p for p in kv)
    assert all(p.startswith("unet/") for p in kv)
    xattn = P.select(toy.params, "xattn")
    assert set(kv) < set(xattn) and all("/attn2/" in p for p in xattn)
    attn = P.select(toy.params, "attn")
    assert set(xattn) < set(attn) and any("/attn1/" in p for p in attn)
    full = P.select(toy.params, "full")
    assert set(attn) < set(full) and len(full) == len(P.flatten(toy.params["unet"]))
    (emb,) = P.select(toy.params, "embedding")
    assert emb.endswith("token_embedding/embedding")
    with pytest.raises(P.ParamsError, match="unknown parameter group"):
        P.select(toy.params, "everything")
    m = P.mask(toy.params, "xattn_kv")
    assert sum(jax.tree.leaves(m)) == len(kv)


def test_split_merge_round_trip(toy):
    sel = P.selection(toy.params, "xattn")
    trainable = sel.split(toy.params)
    assert set(trainable) == set(sel.paths)
    merged = sel.merge(toy.params, trainable)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), merged, toy.params))
    moved = {k: v + 1 for k, v in trainable.items()}
    flat = P.flatten(sel.merge(toy.params, moved))
    base = P.flatten(toy.params)
    for k in flat:
        assert np.array_equal(flat[k], base[k] + 1) if k in moved else flat[k] is base[k]


def test_embedding_moves_only_the_target_rows_even_with_weight_decay(toy):
    ids = P.target_token_ids(toy.tokenizer, ["smiley"], "circle")
    assert ids and not set(ids) & set(toy.tokenizer.all_special_ids)
    assert P.target_token_ids(toy.tokenizer, ["circle"], "circle") == []
    sel = P.selection(toy.params, "embedding", ids)
    trainable = sel.split(toy.params)
    (leaf,) = trainable.values()
    assert leaf.shape == (len(ids), 64)
    tx = P.optimizer(1e-2, weight_decay=0.5)
    state = tx.init(trainable)
    # Optimizer state exists for the selected rows only.
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * leaf.size

    def loss(tr):
        emb = sel.merge(toy.params, tr)["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
        return jnp.sum(emb**2)  # touches every row, so a masking bug would show

    for _ in range(3):
        g = jax.grad(loss)(trainable)
        updates, state = tx.update(g, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    before = np.asarray(toy.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    after = np.asarray(sel.merge(toy.params, trainable)["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    others = np.setdiff1d(np.arange(len(before)), ids)
    assert np.array_equal(after[others], before[others])  # bit-identical
    assert not np.allclose(after[ids], before[ids])
    unet_after = sel.merge(toy.params, trainable)["unet"]
    assert unet_after is toy.params["unet"] or jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), unet_after, toy.params["unet"]))


def test_optimizer_clips_and_skips_non_finite_updates():
    tx = P.optimizer(0.1, weight_decay=0.0, clip_norm=1.0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([jnp.nan, 0.0, 0.0])}, state, params)
    assert np.array_equal(optax.apply_updates(params, updates)["w"], params["w"])
    assert int(state.total_notfinite) == 1
    updates, state = tx.update({"w": jnp.array([1e6, 0.0, 0.0])}, state, params)
    # Adam normalises the step; clipping keeps the first moment finite and the step <= lr.
    assert np.all(np.abs(np.asarray(updates["w"])) <= 0.1 + 1e-6)


def test_learning_rate_and_weight_decay_live_in_the_state_not_the_program():
    # The train step is compiled once with placeholder values; each run's init sets its own.
    params, grads = {"w": jnp.full(3, 2.0)}, {"w": jnp.asarray([1.0, -1.0, 0.5])}
    placeholder = P.optimizer(1.0, weight_decay=0.0)
    traces = []

    @jax.jit
    def update(g, s, p):
        traces.append(1)  # runs once per compilation, not per call
        return placeholder.update(g, s, p)

    for lr, wd in ((1e-3, 0.0), (1e-1, 0.5)):
        tx = P.optimizer(lr, weight_decay=wd)
        expected, _ = tx.update(grads, tx.init(params), params)
        got, _ = update(grads, tx.init(params), params)
        np.testing.assert_allclose(got["w"], expected["w"], rtol=1e-6)
        # First Adam step: -lr * (sign(g) + wd * w).
        np.testing.assert_allclose(got["w"], -lr * (np.sign(grads["w"]) + wd * 2.0), rtol=1e-4, atol=1e-5)
    assert len(traces) == 1
