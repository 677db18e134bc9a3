"""What robust ablation costs on the toy world: its train step and its training against the plain run's.

    python bench/robust_cost.py [--steps 30]

Times three compiled train steps on the same random batches, alternating them so that the
machine's state affects all alike: the default config's (``configs/xattn.py``: cross-attention
keys and values), the same loss on the attention layers (``attn``, the group ``configs/robust.py``
trains), and ``configs/robust.py``'s own (attention layers with the adversary). The steps each
config resolves to on the toy world then give the training's cost. Prints each step's
milliseconds, ``robust_step_cost`` (the adversary's step over the plain step of the same group)
and, last, ``robust_train_cost=<ratio>``: configs/robust.py's training time over configs/xattn.py's.
"""

from __future__ import annotations

import argparse
import time

import config_files
import jax
import numpy as np

from ablate_jax import checkpointing, text_to_image, train
from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax.models import load_pipeline
from ablate_jax.toy import shipped_path


def load_config(name: str):
    return config_lib.resolve(config_files.load(name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    pipe = load_pipeline(shipped_path("pipeline"))
    configs = {"plain": load_config("xattn"), "robust": load_config("robust")}
    configs["plain_attn"] = configs["plain"].copy_and_resolve_references()
    with configs["plain_attn"].unlocked():
        configs["plain_attn"].params = "attn"
    rng = np.random.default_rng(0)
    lat = 32 // pipe.vae_downsample
    batch = {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
             "mask": np.ones((8, lat, lat, 1), np.float32),
             "target_ids": text_to_image.tokenize(pipe, ["a red smiley on a white background"] * 8),
             "anchor_ids": text_to_image.tokenize(pipe, ["a red circle on a white background"] * 8),
             "keep_ids": text_to_image.tokenize(pipe, ["a red frowny on a white background"] * 8)}
    spec = config_lib.prepare(configs["robust"])
    compiled, states = {}, {}
    for name, config in configs.items():
        sel = params_lib.selection(pipe.params, config.params)
        tx = checkpointing.optimizer_for(config)
        adversary = train.adversary_for(config, pipe, spec.concepts)
        compiled[name] = jax.jit(train.make_train_step(pipe, sel, train.loss_config(config), tx, seed=0,
                                                       adversary=adversary))
        states[name] = checkpointing.initial_state(sel.split(pipe.params), tx)
        states[name], m = compiled[name](states[name], pipe.params, batch)  # compile
        jax.block_until_ready(m)
    seconds = {name: 0.0 for name in configs}
    for _ in range(args.steps):
        for name in configs:
            t0 = time.perf_counter()
            states[name], m = compiled[name](states[name], pipe.params, batch)
            jax.block_until_ready(m)
            seconds[name] += time.perf_counter() - t0
    for name, total in seconds.items():
        print(f"{name} ({configs[name].params}, {configs[name].train.steps} steps): "
              f"{total / args.steps * 1e3:.1f} ms per step")
    print(f"robust_step_cost={seconds['robust'] / seconds['plain_attn']:.2f}")
    train_time = {n: seconds[n] * configs[n].train.steps for n in ("plain", "robust")}
    print(f"robust_train_cost={train_time['robust'] / train_time['plain']:.2f}")


if __name__ == "__main__":
    main()
