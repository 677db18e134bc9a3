"""Throughput estimates for Stable Diffusion 1.x at full size, from XLA's FLOP count.

    python bench/estimate.py [--batch 8] [--resolution 512] [--steps 50] [--mfu 0.4]

Lowers the ablate_jax train step (model-based loss, frozen teacher) for the ``xattn_kv`` and
``full`` groups, and one guided sampling step, on abstract SD 1.x-shaped parameters (nothing is
allocated, nothing is measured), and asks XLA for their FLOPs. Dividing an accelerator's peak
bfloat16 rate, times an assumed model FLOP utilisation (``--mfu``), by those counts gives
*estimates* of steps and images per second per chip. They are not measurements.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sd_shapes  # noqa: E402

from ablate_jax import checkpointing, losses  # noqa: E402
from ablate_jax import params as params_lib  # noqa: E402
from ablate_jax.train import make_train_step  # noqa: E402

# Dense bfloat16 peak per chip, TFLOP/s, from the vendors' published specifications.
CHIPS = {
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6e": 918.0,
    "NVIDIA A100": 312.0,
    "NVIDIA H100 / H200 (SXM)": 989.0,
}


def flops(lowered) -> float:
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def train_step_flops(pipe, group: str, batch: int, resolution: int) -> float:
    selection = params_lib.selection(pipe.params, group)
    tx = params_lib.optimizer(1e-5, weight_decay=1e-2, clip_norm=1.0)
    loss_cfg = losses.LossConfig(loss="model_based", teacher="frozen", prior_weight=0.0, preserve_weight=0.0)
    step = make_train_step(pipe, selection, loss_cfg, tx, seed=0)
    state = jax.eval_shape(lambda p: checkpointing.initial_state(selection.split(p), tx), pipe.params)
    lat = resolution // pipe.vae_downsample
    ids = jax.ShapeDtypeStruct((batch, 77), jnp.int32)
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32),
                  "mask": jax.ShapeDtypeStruct((batch, lat, lat, 1), jnp.float32),
                  "target_ids": ids, "anchor_ids": ids}
    return flops(jax.jit(step).lower(state, abstract(pipe.params), batch_spec))


def sampling_flops(pipe, batch: int, resolution: int, steps: int) -> float:
    """Per batch: text encoding, ``steps`` guided UNet calls (batch 2B) and the VAE decode.

    Counted piece by piece because XLA's cost analysis counts a loop's body once.
    """
    lat = resolution // pipe.vae_downsample
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    p = abstract(pipe.params)
    x = jax.ShapeDtypeStruct((2 * batch, lat, lat, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((2 * batch,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((2 * batch, 77, unet.cross_attention_dim), jnp.float32)
    unet_f = flops(jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(p["unet"], x, t, ctx))
    z = jax.ShapeDtypeStruct((batch, lat, lat, 4), jnp.float32)
    vae_f = flops(jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode)).lower(p["vae"], z))
    ids = jax.ShapeDtypeStruct((2 * batch, 77), jnp.int32)
    text_f = flops(jax.jit(lambda p, i: text.apply({"params": p}, i).last_hidden_state).lower(p["text_encoder"], ids))
    return text_f + steps * unet_f + vae_f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50, help="sampling steps per image")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak reached")
    args = ap.parse_args()

    # XLA's attention: on a CPU the models would pick the query-blocked one, a loop whose body the
    # cost analysis counts once.
    pipe = sd_shapes.pipeline(dtype=jnp.bfloat16, attention_implementation="xla")
    print(f"SD 1.x shapes: UNet {sd_shapes.count(pipe.params['unet']) / 1e6:.0f}M, VAE "
          f"{sd_shapes.count(pipe.params['vae']) / 1e6:.0f}M, text encoder "
          f"{sd_shapes.count(pipe.params['text_encoder']) / 1e6:.0f}M parameters; {args.resolution}x{args.resolution}, "
          f"batch {args.batch}")
    work = {}
    for group in ("xattn_kv", "full"):
        work[f"train step, {group}"] = (train_step_flops(pipe, group, args.batch, args.resolution), "steps/s")
    work[f"anchor images ({args.steps} guided steps)"] = (
        sampling_flops(pipe, args.batch, args.resolution, args.steps) / args.batch, "img/s")
    for name, (f, _) in work.items():
        per = "per image" if "images" in name else f"per step of {args.batch}"
        print(f"{name}: {f / 1e12:.2f} TFLOP {per} (XLA cost analysis)")
    print(f"\nEstimates per chip at {args.mfu:.0%} of dense bf16 peak (not measured):")
    head = ["chip", "peak TFLOP/s", *work]
    rows = [[chip, f"{peak:.0f}", *(f"{peak * 1e12 * args.mfu / f:.2f} {unit}" for f, unit in work.values())]
            for chip, peak in CHIPS.items()]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
