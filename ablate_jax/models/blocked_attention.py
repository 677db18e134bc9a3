"""Attention computed one block of queries at a time, for XLA:CPU.

XLA:CPU compiles ``softmax(q k^T) v`` as separate passes over the whole ``[B, N, T, S]`` score
tensor: the logits matmul writes it, the softmax reads and writes it three times, the second matmul
reads it again. At the UNet's top level that tensor is tens of megabytes, so the attention runs at
memory speed: on a 2-core machine, 256 tokens, 8 heads and a batch of 16 took 55 ms forward where
PyTorch's fused CPU kernel took 11 ms. Here a loop over query blocks keeps each block's scores
(a few megabytes) in cache, and a hand-written backward pass recomputes the probabilities block by
block from the saved log-sum-exp instead of storing them, as flash attention does. Same shapes and
float32 logits as ``jax.nn.dot_product_attention``; results agree to float32 rounding.

``dot_product_attention`` chooses: this path on CPU for score matrices of at least
``MIN_SCORES`` entries per head, ``jax.nn.dot_product_attention`` otherwise (GPU, TPU, small
matrices, or an explicit ``implementation`` other than ``"blocked"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this many scores per (example, head), the whole matrix already sits in cache and XLA's own
# attention is as fast (measured: 64 x 64 tokens, equal times); from 128 x 128 up blocking wins.
MIN_SCORES = 128 * 128
# Scores per query block across batch and heads, in bytes: 4 MiB measured fastest on 256 and 1024
# tokens (blocks of 2 or 4 queries were 2-3x slower than 8 or more: too little work per matmul).
BLOCK_BYTES = 4 << 20
MIN_BLOCK = 8


def query_block(batch: int, heads: int, q_len: int, kv_len: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Queries per block: the largest divisor of ``q_len`` whose float32 scores for the whole batch
    and all heads fit ``block_bytes``, but no fewer than ``MIN_BLOCK`` queries when ``q_len`` allows."""
    divisors = [d for d in range(1, q_len + 1) if q_len % d == 0]
    floor = min((d for d in divisors if d >= MIN_BLOCK), default=q_len)
    fits = [d for d in divisors if d >= floor and batch * heads * d * kv_len * 4 <= block_bytes]
    return max(fits, default=floor)


def _block_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One block: ``q [B, N, t, H]`` (already scaled), ``k, v [B, N, S, H]``; returns the output
    ``[B, N, t, H]`` and the log-sum-exp of each query's logits ``[B, N, t]``."""
    logits = jnp.einsum("bnth,bnsh->bnts", q, k)
    peak = logits.max(-1, keepdims=True)
    weights = jnp.exp(logits - peak)
    total = weights.sum(-1, keepdims=True)
    # Normalising the [t, H] output instead of the [t, S] weights saves a pass over the scores.
    out = jnp.einsum("bnts,bnsh->bnth", weights, v) / total
    return out, (peak + jnp.log(total))[..., 0]


@jax.custom_vjp
def _blocked(q_blocks: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.lax.map(lambda qb: _block_forward(qb, k, v)[0], q_blocks)


def _blocked_fwd(q_blocks, k, v):
    out, lse = jax.lax.map(lambda qb: _block_forward(qb, k, v), q_blocks)
    return out, (q_blocks, k, v, out, lse)


def _blocked_bwd(residuals, d_out):
    q_blocks, k, v, out, lse = residuals

    def block(carry, xs):
        dk, dv = carry
        qb, ob, lb, dob = xs
        # Scores are laid out [S, t] here so that the two products that sum over queries (dk, dv)
        # are plain matrix products; XLA:CPU runs products over a transposed operand 2-3x slower,
        # and only dq needs one.
        probs_t = jnp.exp(jnp.einsum("bnsh,bnth->bnst", k, qb) - lb[..., None, :])
        dv = dv + jnp.einsum("bnst,bnth->bnsh", probs_t, dob)
        d_probs_t = jnp.einsum("bnsh,bnth->bnst", v, dob)
        # softmax backward: p * (dp - sum(p * dp)), where sum(p * dp) = sum(o * do) over H.
        d_logits_t = probs_t * (d_probs_t - (dob * ob).sum(-1)[..., None, :])
        dk = dk + jnp.einsum("bnst,bnth->bnsh", d_logits_t, qb)
        dq = jnp.einsum("bnst,bnsh->bnth", d_logits_t, k)
        return (dk, dv), dq

    (dk, dv), dq = jax.lax.scan(block, (jnp.zeros_like(k), jnp.zeros_like(v)), (q_blocks, out, lse, d_out))
    return dq, dk, dv


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, block_bytes: int = BLOCK_BYTES
) -> jax.Array:
    """``softmax(scale * q k^T) v`` for ``q [B, T, N, H]``, ``k, v [B, S, N, H]`` (the layout of
    ``jax.nn.dot_product_attention``), looping over blocks of queries (``query_block``); computed
    in float32, returned in ``q``'s dtype."""
    dtype = q.dtype
    b, t, n, h = q.shape
    s = k.shape[1]
    tq = query_block(b, n, t, s, block_bytes)
    q = q.astype(jnp.float32) * scale
    q_blocks = q.reshape(b, t // tq, tq, n, h).transpose(1, 0, 3, 2, 4)  # [T/tq, B, N, tq, H]
    k, v = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (k, v))  # [B, N, S, H]
    out = _blocked(q_blocks, k, v)
    return out.transpose(1, 0, 3, 2, 4).reshape(b, t, n, h).astype(dtype)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, implementation: str | None = None
) -> jax.Array:
    """``jax.nn.dot_product_attention``'s contract (``[B, T, N, H]`` layout, no mask), with
    ``implementation="blocked"`` added and chosen by default on CPU for large score matrices."""
    if implementation == "blocked" or (
        implementation is None and jax.default_backend() == "cpu" and q.shape[1] * k.shape[1] >= MIN_SCORES
    ):
        return blocked_attention(q, k, v, scale=scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
