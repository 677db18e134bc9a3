"""Query-blocked CPU attention against jax.nn.dot_product_attention: values, gradients, dtypes,
sharding, and when the models choose it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ablate_jax.models import blocked_attention as ba


def _qkv(b: int, t: int, s: int, n: int, h: int, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)).astype(dtype)
    k, v = (rng.standard_normal((b, s, n, h)).astype(dtype) for _ in range(2))
    return q, k, v


def _loss(attention):
    # A fixed random cotangent so that every output element weighs differently in the gradient.
    def loss(q, k, v):
        out = attention(q, k, v)
        w = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
        return (out * w).sum()

    return loss


@pytest.mark.parametrize(
    ("batch", "heads", "q_len", "kv_len", "block_bytes", "want"),
    [
        (16, 8, 256, 256, ba.BLOCK_BYTES, 32),  # 4 MiB exactly
        (16, 8, 256, 77, ba.BLOCK_BYTES, 64),  # 106 queries would fit; 64 is the largest divisor
        (16, 8, 1024, 1024, ba.BLOCK_BYTES, 8),
        (64, 8, 4096, 4096, ba.BLOCK_BYTES, 8),  # nothing fits: never below MIN_BLOCK queries
        (1, 1, 7, 7, ba.BLOCK_BYTES, 7),  # no divisor of 7 reaches MIN_BLOCK: one block
        (2, 2, 40, 40, 2 * 2 * 10 * 40 * 4, 10),
    ],
)
def test_query_block(batch, heads, q_len, kv_len, block_bytes, want):
    assert ba.query_block(batch, heads, q_len, kv_len, block_bytes) == want


@pytest.mark.parametrize(
    ("b", "t", "s", "n", "h", "block_bytes"),
    [
        (2, 64, 64, 4, 8, 2 * 4 * 8 * 64 * 4),  # self-attention, 8 blocks
        (2, 48, 77, 2, 16, 2 * 2 * 16 * 77 * 4),  # cross-attention with CLIP's 77 tokens, 3 blocks
        (3, 40, 40, 1, 32, ba.BLOCK_BYTES),  # one block, a single head as in the VAE
    ],
)
def test_values_and_gradients_match_xla(b, t, s, n, h, block_bytes):
    q, k, v = _qkv(b, t, s, n, h)
    scale = h**-0.5
    blocked = lambda q, k, v: ba.blocked_attention(q, k, v, scale=scale, block_bytes=block_bytes)  # noqa: E731
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")  # noqa: E731
    with jax.default_matmul_precision("highest"):
        got, want = jax.jit(blocked)(q, k, v), jax.jit(xla)(q, k, v)
        got_grads = jax.jit(jax.grad(_loss(blocked), argnums=(0, 1, 2)))(q, k, v)
        want_grads = jax.jit(jax.grad(_loss(xla), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        scale_w = float(jnp.abs(w).max())
        assert float(jnp.abs(g - w).max()) <= 2e-5 * scale_w, name


def test_large_logits_do_not_overflow():
    # Logits of several hundred: exp without the per-query maximum subtracted would be inf.
    q, k, v = _qkv(1, 32, 32, 2, 8)
    q = q * 100.0
    got = ba.blocked_attention(q, k, v, scale=1.0, block_bytes=1)
    want = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="xla")
    assert bool(jnp.isfinite(got).all())
    # Logits of size L carry float32 rounding of about L * eps, which differs between the blocked and
    # the fused sums; it moves each softmax weight, and so each output (a weighted mean of unit-scale
    # values), by about as much. Without the maximum subtracted the outputs would be inf or NaN.
    logit_max = float(np.abs(np.einsum("btnh,bsnh->bnts", q, k)).max())
    np.testing.assert_allclose(got, want, atol=4 * logit_max * np.finfo(np.float32).eps)
    grads = jax.grad(lambda q: ba.blocked_attention(q, k, v, scale=1.0, block_bytes=1).sum())(q)
    assert bool(jnp.isfinite(grads).all())


def test_half_precision_inputs_keep_their_dtype_and_compute_in_float32():
    q, k, v = _qkv(2, 32, 32, 2, 8)
    q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    got = ba.blocked_attention(q16, k16, v16, scale=8**-0.5, block_bytes=1)
    assert got.dtype == jnp.bfloat16
    want = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q16, k16, v16)), scale=8**-0.5)
    # Only the output's rounding to bfloat16 (8 bits of mantissa) separates the two.
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=1e-2)


def test_batch_sharded_over_eight_devices_matches_one_device():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    batch = NamedSharding(mesh, P("data"))
    q, k, v = _qkv(8, 32, 32, 2, 8)
    fn = jax.jit(jax.value_and_grad(_loss(lambda q, k, v: ba.blocked_attention(q, k, v, scale=0.3, block_bytes=1)),
                                    argnums=(0, 1, 2)))
    want_loss, want_grads = fn(q, k, v)
    got_loss, got_grads = fn(*(jax.device_put(x, batch) for x in (q, k, v)))
    assert got_grads[0].sharding.is_equivalent_to(batch, 4)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)


def _uses_blocked(fn, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def test_dispatch_picks_blocked_on_cpu_for_large_score_matrices():
    assert jax.default_backend() == "cpu"
    big = _qkv(1, 128, 128, 1, 8)
    small = _qkv(1, 64, 77, 1, 8)
    pick = lambda impl: lambda q, k, v: ba.dot_product_attention(q, k, v, scale=1.0, implementation=impl)  # noqa: E731
    assert _uses_blocked(pick(None), *big)
    assert not _uses_blocked(pick(None), *small)
    assert not _uses_blocked(pick("xla"), *big)
    assert _uses_blocked(pick("blocked"), *small)
