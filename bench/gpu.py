"""Stable Diffusion 1.x at full size on one accelerator: anchor images/s, train steps/s and memory.

    bash bench/gpu.sh [OUT_DIR]              # on a machine with an NVIDIA GPU
    python bench/gpu.py --size=tiny --resolution=64 --batch=2 --sample-steps=2 --out=/tmp/g   # CPU check

Random weights in SD 1.x shapes (860M UNet, KL VAE, CLIP ViT-L/14 text tower), float32
parameters, bfloat16 compute. Measures, after compilation:
- anchor generation: the whole text -> image program (DPM-Solver++ with guidance, VAE decode);
- the ablate_jax train step (model-based loss, frozen teacher) for ``xattn_kv`` and ``full``.
Each figure comes with XLA's FLOP count of the program and the fraction of the chip's dense
bfloat16 peak it reaches, and the device's peak memory. Attention goes through cuDNN's fused
kernel where JAX offers it (``--attention=auto`` tries it and falls back to XLA's). The table is
printed and written with the raw numbers to OUT_DIR (``gpu.md``, ``gpu.json``).

``--memory=GROUP:REMAT`` instead runs that train step alone (bfloat16 compute, ``--batch``) and
prints one JSON line with XLA's planned bytes and the device's peak bytes in use; ``bench/gpu.sh``
runs it in a fresh process per setting, since a process's peak cannot be reset. Nothing here
imports TensorFlow (``tensorflow_in_process`` in the JSON says so).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import estimate  # noqa: E402
import sd_shapes  # noqa: E402

from ablate_jax import checkpointing, losses, sharding, text_to_image  # noqa: E402
from ablate_jax import params as params_lib  # noqa: E402
from ablate_jax.train import encode_chunks_for, make_train_step  # noqa: E402

# Dense bfloat16 peak, TFLOP/s, by the device kind JAX reports (vendors' specifications).
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40": 181.0,
         "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def chip_peak(device: jax.Device) -> float | None:
    kind = device.device_kind
    for name, peak in PEAKS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def peak_memory_gib(device: jax.Device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**30


def timed(fn, reps: int) -> float:
    """Seconds per call, after one call that compiles and warms up."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def pick_attention(requested: str) -> str | None:
    """``cudnn`` where it compiles and runs on this device, else XLA's attention."""
    if requested == "xla":
        return "xla"
    if requested == "cudnn" or jax.default_backend() == "gpu":
        q = jnp.ones((1, 64, 8, 64), jnp.bfloat16)
        try:
            jax.block_until_ready(jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, implementation="cudnn"))(q))
            return "cudnn"
        except Exception as err:  # noqa: BLE001  (any failure means: not available here)
            if requested == "cudnn":
                raise
            print(f"cuDNN attention unavailable ({type(err).__name__}); using XLA's", file=sys.stderr)
    return None


def bench_generation(pipe, count_pipe, mesh, args) -> dict:
    cfg = text_to_image.SamplingConfig(sampler="dpmpp_2m", num_steps=args.sample_steps, guidance_scale=6.0,
                                  height=args.resolution, width=args.resolution)
    run = text_to_image._compiled(pipe, cfg, mesh)  # noqa: SLF001  (the program generate() runs, without host copies)
    b = args.batch
    ids = text_to_image.tokenize(pipe, ["a photo of a cat"] * b)
    uncond = text_to_image.tokenize(pipe, [""])
    keys = jax.random.split(jax.random.key(0), b)
    h, w, c = text_to_image.latent_shape(pipe, cfg)
    latents = jax.random.normal(jax.random.key(1), (b, h, w, c), jnp.float32)
    params = jax.device_put(pipe.params, sharding.replicated(mesh))
    seconds = timed(lambda: run(params, ids, uncond, keys, latents), args.reps)
    flops = estimate.sampling_flops(count_pipe, b, args.resolution, args.sample_steps)
    return {"what": f"anchor images ({args.sample_steps} DPM++ steps, guidance 6)", "per_s": b / seconds,
            "unit": "img/s", "seconds": seconds, "flops": flops}


def bench_train(pipe, count_pipe, mesh, group: str, args, remat: str = "none") -> dict:
    selection = params_lib.selection(pipe.params, group)
    tx = params_lib.optimizer(1e-5, weight_decay=1e-2, clip_norm=1.0)
    loss_cfg = losses.LossConfig(loss="model_based", teacher="frozen", prior_weight=0.0, preserve_weight=0.0)
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    # As ablate_jax.train runs it: the frozen base in the compute dtype, the VAE encoding in chunks.
    chunks = encode_chunks_for(args.encode_chunks, args.batch // mesh.size)
    step = jax.jit(make_train_step(pipe, selection, loss_cfg, tx, seed=0, remat=remat, encode_chunks=chunks),
                   in_shardings=(rep, rep, data), out_shardings=(rep, rep), donate_argnums=(0,))
    base = jax.device_put(params_lib.frozen_for_compute(pipe.params, jnp.bfloat16), rep)
    # A copy: the state is donated, and must not share buffers with the base.
    trainable = jax.tree.map(jnp.copy, selection.split(pipe.params))
    box = {"state": jax.device_put(checkpointing.initial_state(trainable, tx), rep)}
    b, r = args.batch, args.resolution
    lat = r // pipe.vae_downsample
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "image": rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32),
        "mask": np.ones((b, lat, lat, 1), np.float32),
        "target_ids": text_to_image.tokenize(pipe, ["a photo of a grumpy cat"] * b),
        "anchor_ids": text_to_image.tokenize(pipe, ["a photo of a cat"] * b),
    }, data)

    def one():
        box["state"], metrics = step(box["state"], base, batch)
        return metrics["loss"]

    memory = step.lower(box["state"], base, batch).compile().memory_analysis()
    planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes) / 2**30 if memory is not None else None
    seconds = timed(one, args.reps)
    flops = estimate.train_step_flops(count_pipe, group, b, r) if count_pipe is not None else None
    return {"what": f"train step, {group} (batch {b}{', remat ' + remat if remat != 'none' else ''})",
            "per_s": 1.0 / seconds, "unit": "steps/s", "seconds": seconds, "flops": flops, "planned_gib": planned}


def memory_run(args) -> None:
    """One train step setting in this process: planned and peak bytes, as one JSON line."""
    group, remat = args.memory.split(":")
    device = jax.devices()[0]
    mesh = sharding.make_mesh(jax.devices()[:1])
    pipe = sd_shapes.pipeline(size=args.size, dtype=jnp.bfloat16, abstract=False,
                              attention_implementation=pick_attention(args.attention))
    row = bench_train(pipe, None, mesh, group, args, remat=remat)
    row.update(group=group, remat=remat, batch=args.batch, peak_gib=peak_memory_gib(device),
               tensorflow_in_process="tensorflow" in sys.modules)
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=5, help="timed calls after the warm-up call")
    ap.add_argument("--attention", choices=("auto", "cudnn", "xla"), default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak (default: by kind)")
    ap.add_argument("--out", default="bench-gpu", help="folder for gpu.md and gpu.json")
    ap.add_argument("--encode-chunks", type=int, default=8, help="train.encode_chunks (Stable Diffusion's default)")
    ap.add_argument("--memory", default=None, help="GROUP:REMAT: measure that train step's memory alone")
    ap.add_argument("--memory-rows", default=None, help="a file of --memory JSON lines to add to the table")
    args = ap.parse_args()
    if args.memory:
        memory_run(args)
        return

    device = jax.devices()[0]
    mesh = sharding.make_mesh(jax.devices()[:1])
    attention = pick_attention(args.attention)
    peak = args.peak_tflops or chip_peak(device)
    pipe = sd_shapes.pipeline(size=args.size, dtype=jnp.bfloat16, abstract=False, attention_implementation=attention)
    # FLOPs are counted on XLA's plain attention, the same count whichever attention runs: cuDNN's
    # attention is one opaque call to the cost analysis, and the CPU's query-blocked attention a
    # loop whose body it counts once.
    count_pipe = sd_shapes.pipeline(size=args.size, dtype=jnp.bfloat16, attention_implementation="xla")
    header = (f"{device.device_kind} ({jax.default_backend()}), SD 1.x shapes ({args.size}: UNet "
              f"{sd_shapes.count(pipe.params['unet']) / 1e6:.0f}M parameters), {args.resolution}x{args.resolution}, "
              f"bfloat16 compute, attention: {attention or 'xla'}, jax {jax.__version__}")
    print(header, flush=True)
    rows = [bench_generation(pipe, count_pipe, mesh, args)]
    for group in ("xattn_kv", "full"):
        rows.append(bench_train(pipe, count_pipe, mesh, group, args))
    memory = peak_memory_gib(device)
    for row in rows:
        row["tflops_per_s"] = row["flops"] / row["seconds"] / 1e12
        row["fraction_of_peak"] = row["tflops_per_s"] / peak if peak else None

    lines = [header, "", "| what | rate | XLA TFLOP per call | achieved TFLOP/s | fraction of bf16 peak |",
             "|---|---|---|---|---|"]
    for row in rows:
        frac = f"{row['fraction_of_peak']:.1%}" if row["fraction_of_peak"] is not None else "unknown peak"
        lines.append(f"| {row['what']} | {row['per_s']:.3f} {row['unit']} | {row['flops'] / 1e12:.3g} | "
                     f"{row['tflops_per_s']:.3g} | {frac} |")
    lines += ["", f"peak device memory: {memory:.1f} GiB" if memory is not None else "peak device memory: not reported",
              f"chip peak used: {peak} TFLOP/s" if peak else "chip peak: unknown (pass --peak-tflops)"]
    memory_rows = []
    if args.memory_rows and Path(args.memory_rows).exists():
        memory_rows = [json.loads(ln) for ln in Path(args.memory_rows).read_text().splitlines() if ln.startswith("{")]
    if memory_rows:
        lines += ["", f"train step memory, bfloat16 compute, batch {args.batch}, one process each:", "",
                  "| group | remat | XLA planned (GiB) | device peak in use (GiB) | steps/s |", "|---|---|---|---|---|"]
        for m in memory_rows:
            planned = f"{m['planned_gib']:.2f}" if m.get("planned_gib") is not None else "n/a"
            peak_in_use = f"{m['peak_gib']:.2f}" if m.get("peak_gib") is not None else "not reported"
            lines.append(f"| {m['group']} | {m['remat']} | {planned} | {peak_in_use} | {m['per_s']:.3f} |")
    lines.append(f"TensorFlow imported: {'yes' if 'tensorflow' in sys.modules else 'no'}")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.md").write_text(text + "\n")
    (out / "gpu.json").write_text(json.dumps({"header": header, "rows": rows, "peak_tflops": peak,
                                              "peak_memory_gib": memory, "memory_rows": memory_rows,
                                              "tensorflow_in_process": "tensorflow" in sys.modules,
                                              "args": vars(args)}, indent=1))
    print(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'}")


if __name__ == "__main__":
    main()
