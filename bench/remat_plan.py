"""Does rematerialisation lower XLA's planned memory on this backend? A minimal case.

    python bench/remat_plan.py

The gradient of a 16-layer ``tanh(x @ w)`` MLP (4,096 x 1,024 activations, float32) is compiled
four ways: storing every activation; with ``jax.checkpoint`` over 4 blocks of 4 layers; with a
custom VJP that recomputes each block after an optimization barrier with the incoming cotangent;
and with a custom VJP that recomputes each block inside a ``lax.cond`` on a value of that
cotangent. Storing everything holds 16 activations (256 MiB); checkpointing should hold the 4
block inputs and one block's recomputation (about 128 MiB). The temporaries XLA plans for each are
printed in MiB. On XLA:CPU only the last gets there: a conditional's branch is a computation of
its own, which runs, and holds its buffers, only once its operands exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LAYERS, PER_BLOCK = 16, 4


def block(ws, x):
    for w in ws:
        x = jnp.tanh(x @ w)
    return x


def recomputed(run):
    """A wrapper that stores only ``f``'s inputs and recomputes ``f`` in the backward pass;
    ``run(recompute, (ws, x, ct))`` decides when ``recompute(ws, x, ct)`` may run."""

    def wrap(f):
        @jax.custom_vjp
        def g(ws, x):
            return f(ws, x)

        def fwd(ws, x):
            return f(ws, x), (ws, x)

        def bwd(res, ct):
            return run(lambda ws, x, ct: jax.vjp(f, ws, x)[1](ct), (*res, ct))

        g.defvjp(fwd, bwd)
        return g

    return wrap


# After an optimization barrier that ties the stored inputs to the cotangent.
tied = recomputed(lambda recompute, args: recompute(*jax.lax.optimization_barrier(args)))
# Inside a conditional on a value of the cotangent. Both branches are the same: the predicate only
# makes the branch wait for the cotangent.
in_cond = recomputed(lambda recompute, args: jax.lax.cond(
    jnp.isfinite(args[-1].reshape(-1)[0]), lambda a: recompute(*a), lambda a: recompute(*a), args))


def planned_mib(wrap) -> float:
    f = wrap(block)

    def loss(ws, x):
        for i in range(0, LAYERS, PER_BLOCK):
            x = f(ws[i:i + PER_BLOCK], x)
        return jnp.sum(x**2)

    ws = [jax.ShapeDtypeStruct((1024, 1024), jnp.float32)] * LAYERS
    x = jax.ShapeDtypeStruct((4096, 1024), jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    print(f"backend: {jax.default_backend()}")
    for name, wrap in (("store all", lambda f: f), ("jax.checkpoint per block", jax.checkpoint),
                       ("recompute after the cotangent", tied), ("recompute in a conditional", in_cond)):
        print(f"{name:<30} {planned_mib(wrap):8.1f} MiB planned temporaries")


if __name__ == "__main__":
    main()
