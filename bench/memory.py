"""Memory of the train step at Stable Diffusion 1.x's full size, against the PyTorch reference.

    python bench/memory.py                      # the whole table, then the reference (about an hour on 2 cores)
    python bench/memory.py --no-reference --groups=xattn_kv --dtypes=bfloat16 --remat=blocks

For SD 1.x at 512x512 (860M UNet, KL VAE, CLIP ViT-L/14 text tower; float32 parameters), each
parameter group, float32 and bfloat16 compute, and each ``train.remat`` setting: the train step
as ``ablate_jax.train`` runs it (the frozen base in the compute dtype, the VAE encoding in
``train.encode_chunks`` chunks) is compiled for the batch (8 by default) on abstract parameters,
nothing allocated, and XLA's
memory analysis gives what the compiled program plans to hold at once: its arguments (frozen
parameters, train state, batch), its temporaries and its outputs, less the outputs that reuse
the donated state's buffers. That is the program's own need; a runtime adds its fragmentation and
workspaces on top.

Beside it, the PyTorch reference (``bench/reference_torch.py``: the same model-based step for
``xattn_kv`` with diffusers' UNet, a frozen copy as teacher, AdamW) runs one step in a fresh
process per batch size on random full-size weights, from 1 upwards until the next batch would not
fit this machine's memory, and its peak resident memory is read. At the largest batch that ran,
ablate_jax's float32 plan (best remat setting) is set against it as a ratio.

These are XLA:CPU's plans. They overstate a bfloat16 step (XLA:CPU converts each convolution's
bfloat16 operands and kernel to float32 copies) and do not show what ``train.remat`` saves (its
scheduler does not hold recomputation back until the backward pass needs it); ``bench/gpu.py``
measures peak bytes in use on a GPU.

The last line is ``xattn_kv_bf16_b8_gib=<x>``: the ``xattn_kv`` step at batch 8 with bfloat16
compute and the remat setting that plans least.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

GIB = 2**30


def planned_bytes(group: str, dtype: str, remat: str, batch: int, resolution: int, size: str,
                  encode_chunks: int = 8) -> dict:
    """XLA's memory analysis of the compiled train step (compiled for the first local device)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import sd_shapes

    from ablate_jax import checkpointing, losses
    from ablate_jax import params as params_lib
    from ablate_jax.train import encode_chunks_for, make_train_step

    pipe = sd_shapes.pipeline(size=size, dtype=jnp.dtype(dtype), abstract=True)
    rows = [] if group != "embedding" else [320, 1125]  # two target tokens, as a short name has
    selection = params_lib.selection(pipe.params, group, rows)
    tx = params_lib.optimizer(1e-5, weight_decay=1e-2, clip_norm=1.0)
    loss_cfg = losses.LossConfig(loss="model_based", teacher="frozen",
                                 prior_weight=1.0 if group == "full" else 0.0, preserve_weight=0.0)
    # What ablate_jax.train runs: the frozen base in the compute dtype, the VAE encoding in chunks.
    chunks = encode_chunks_for(encode_chunks, batch)  # compiled for one device
    step = make_train_step(pipe, selection, loss_cfg, tx, seed=0, remat=remat, encode_chunks=chunks)
    state = jax.eval_shape(lambda p: checkpointing.initial_state(selection.split(p), tx), pipe.params)
    base = jax.eval_shape(lambda p: params_lib.frozen_for_compute(p, jnp.dtype(dtype)), pipe.params)
    lat = resolution // pipe.vae_downsample
    ids = jax.ShapeDtypeStruct((batch, 77), jnp.int32)
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32),
        "mask": jax.ShapeDtypeStruct((batch, lat, lat, 1), jnp.float32),
        "target_ids": ids, "anchor_ids": ids,
    }
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, base, batch_shapes).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"group": group, "dtype": dtype, "remat": remat, "batch": batch, "resolution": resolution,
            "encode_chunks": chunks,
            "arguments_gib": m.argument_size_in_bytes / GIB, "temporaries_gib": m.temp_size_in_bytes / GIB,
            "outputs_gib": (m.output_size_in_bytes - m.alias_size_in_bytes) / GIB, "planned_gib": total / GIB,
            "trainable": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"])),
            "compile_s": seconds}


REFERENCE_CHILD = r'''
import json, resource, sys, time
import torch
sys.path.insert(0, {bench!r})
from reference_torch import make_reference_step
batch, resolution, folder = {batch}, {resolution}, {folder!r}
torch.manual_seed(0)
step = make_reference_step(folder, batch_size=batch, lr=1e-5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
images = torch.rand(batch, 3, resolution, resolution) * 2 - 1
t0 = time.perf_counter()
loss = step(images, ["a photo of a grumpy cat"] * batch, ["a photo of a cat"] * batch)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"batch": batch, "peak_gib": peak * 1024 / 2**30, "after_load_gib": before * 1024 / 2**30,
                  "step_s": seconds, "loss": loss}}))
'''


def reference_peak(folder: Path, batch: int, resolution: int) -> dict | None:
    """Peak resident memory of one reference step in a fresh process; None when it did not finish."""
    code = REFERENCE_CHILD.format(bench=str(HERE), batch=batch, resolution=resolution, folder=str(folder))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  reference at batch {batch}: did not finish (exit {proc.returncode}: "
              f"{(proc.stderr.strip().splitlines() or ['killed'])[-1][:120]})", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="xattn_kv,xattn,attn,full,embedding")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--remat", default="none,attention,blocks")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: the same layout, narrow (a check)")
    ap.add_argument("--encode-chunks", type=int, default=8, help="train.encode_chunks (Stable Diffusion's default)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-batches", default="1,2,4,8", help="tried in order until one does not fit")
    ap.add_argument("--reference-model", default=None, help="an SD 1.x diffusers folder (default: random weights)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()

    from ablate_jax import distributed

    distributed.tune_cpu_compiler()
    groups, dtypes, remats = (args.groups.split(","), args.dtypes.split(","), args.remat.split(","))
    rows = []
    print(f"train step, SD 1.x shapes ({args.size}), {args.resolution}x{args.resolution}, batch {args.batch}: "
          "XLA's planned memory (GiB)", flush=True)
    print(f"{'group':<10} {'compute':<9} {'remat':<10} {'arguments':>9} {'temporaries':>11} {'outputs':>8} "
          f"{'planned':>8}", flush=True)
    for group in groups:
        for dtype in dtypes:
            for remat in remats:
                r = planned_bytes(group, dtype, remat, args.batch, args.resolution, args.size, args.encode_chunks)
                rows.append(r)
                print(f"{group:<10} {dtype:<9} {remat:<10} {r['arguments_gib']:9.2f} {r['temporaries_gib']:11.2f} "
                      f"{r['outputs_gib']:8.2f} {r['planned_gib']:8.2f}", flush=True)

    result: dict = {"rows": rows}
    if not args.no_reference:
        folder = Path(args.reference_model) if args.reference_model else None
        with tempfile.TemporaryDirectory() as tmp:
            if folder is None:
                from full_models import save_sd_pipeline

                folder = save_sd_pipeline(Path(tmp) / "sd1", "sd1")
            limit = machine_gib()
            best = None
            for b in (int(x) for x in args.reference_batches.split(",")):
                ref = reference_peak(folder, b, args.resolution)
                if ref is None:
                    break
                print(f"  reference at batch {b}: peak {ref['peak_gib']:.2f} GiB resident "
                      f"({ref['after_load_gib']:.2f} after loading), one step {ref['step_s']:.0f} s", flush=True)
                best = ref
                # The next batch would roughly double what the step adds to the loaded models.
                if ref["peak_gib"] + (ref["peak_gib"] - ref["after_load_gib"]) > 0.9 * limit:
                    break
        if best is not None:
            b = best["batch"]
            ours = min((planned_bytes("xattn_kv", "float32", remat, b, args.resolution, args.size, args.encode_chunks)
                        for remat in remats), key=lambda r: r["planned_gib"])
            ratio = ours["planned_gib"] / best["peak_gib"]
            print(f"at batch {b}: ablate_jax plans {ours['planned_gib']:.2f} GiB (xattn_kv, float32, remat "
                  f"{ours['remat']}); the PyTorch reference peaked at {best['peak_gib']:.2f} GiB: ratio {ratio:.2f}")
            result["reference"] = {"batch": b, "reference_peak_gib": best["peak_gib"], "ours": ours, "ratio": ratio}
    kv_bf16 = [r for r in rows if r["group"] == "xattn_kv" and r["dtype"] == "bfloat16" and r["batch"] == 8]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if kv_bf16:
        print(f"xattn_kv_bf16_b8_gib={min(r['planned_gib'] for r in kv_bf16):.2f}")


if __name__ == "__main__":
    main()
