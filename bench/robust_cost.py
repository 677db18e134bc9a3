"""The train step's time with robust ablation's adversary against the plain step, on the toy world.

    python bench/robust_cost.py [--steps 30] [--adversary_steps 3]

Both steps are the default config's (cross-attention keys and values, model-based loss, frozen
teacher, preservation) on the same random batches, compiled first and timed over ``--steps``
calls each, alternating the two so that the machine's state affects both alike. Prints each
step's seconds and the last line ``robust_step_cost=<ratio>``.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from ablate_jax import checkpointing, losses, text_to_image, train
from ablate_jax import params as params_lib
from ablate_jax.models import load_pipeline
from ablate_jax.toy import shipped_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--adversary_steps", type=int, default=3)
    args = ap.parse_args()
    pipe = load_pipeline(shipped_path("pipeline"))
    sel = params_lib.selection(pipe.params, "xattn_kv")
    tx = params_lib.optimizer(3e-4)
    rng = np.random.default_rng(0)
    lat = 32 // pipe.vae_downsample
    batch = {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
             "mask": np.ones((8, lat, lat, 1), np.float32),
             "target_ids": text_to_image.tokenize(pipe, ["a red smiley on a white background"] * 8),
             "anchor_ids": text_to_image.tokenize(pipe, ["a red circle on a white background"] * 8),
             "keep_ids": text_to_image.tokenize(pipe, ["a red frowny on a white background"] * 8)}
    rows = tuple(params_lib.target_token_ids(pipe.tokenizer, ("smiley",), "circle"))
    steps = {
        "plain": train.make_train_step(pipe, sel, losses.LossConfig(preserve_weight=4.0), tx, seed=0),
        "robust": train.make_train_step(pipe, sel, losses.LossConfig(preserve_weight=4.0, adversarial_weight=1.0),
                                        tx, seed=0, adversary=train.Adversary(rows, 0.5, args.adversary_steps)),
    }
    compiled, states = {}, {}
    for name, fn in steps.items():
        compiled[name] = jax.jit(fn)
        states[name] = checkpointing.initial_state(sel.split(pipe.params), tx)
        states[name], m = compiled[name](states[name], pipe.params, batch)  # compile
        jax.block_until_ready(m)
    seconds = {name: 0.0 for name in steps}
    for _ in range(args.steps):
        for name in steps:
            t0 = time.perf_counter()
            states[name], m = compiled[name](states[name], pipe.params, batch)
            jax.block_until_ready(m)
            seconds[name] += time.perf_counter() - t0
    for name, total in seconds.items():
        print(f"{name}: {total / args.steps * 1e3:.1f} ms per step")
    print(f"robust_step_cost={seconds['robust'] / seconds['plain']:.2f}")


if __name__ == "__main__":
    main()
