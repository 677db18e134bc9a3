"""Train steps per second: ablate_jax's jitted step against the PyTorch reference (bench/reference_torch.py).

Both sides train the same weights (the ``xattn_kv`` group, model-based loss, frozen teacher, no
preservation or prior term, AdamW with clipping) on the same batch size, on this machine's CPU,
in one process, alternating rounds so that machine noise hits both alike. Also printed: XLA's
FLOP count for one step, the GFLOP/s both sides reach with it, the GFLOP/s of a large float32
matmul on this machine, and each side's peak memory. The last line is ``speedup_vs_torch=<x>``
(ablate_jax steps/s divided by PyTorch steps/s).

    .venv/bin/python bench/train_step.py --model=toy
    .venv/bin/python bench/train_step.py --model=small --batch=8 --steps=5

``small`` is a random UNet shaped like Stable Diffusion 1.x (four levels, two ResNet and
transformer blocks per level, 8 heads) at a fifth of its width, on 32x32 (``--pixels=64``:
64x64) images.

``--baseline=NAME`` (repeatable) adds an ablate_jax side with one of its CPU choices undone, timed
in the same alternation, to measure that choice by itself: ``xla-attention`` (JAX's plain XLA
attention instead of the query-blocked one) or ``ynn-reductions`` (XLA's default YNNPACK fusion
list, reductions included). It prints ``change_vs_<NAME>=`` (ablate_jax over the baseline).

    .venv/bin/python bench/train_step.py --model=small --batch=8 --steps=3 --baseline=xla-attention --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # reference_torch
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny reference models

TARGET = "a photo of a smiley face"
ANCHOR = "a photo of a face"


def save_small_pipeline(out: Path, pixels: int = 32, seed: int = 0) -> Path:
    """A random diffusers folder with an SD 1.x-shaped UNet at 1/5 width (64, 128, 256, 256)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_models import VOCAB_SIZE, _perturb, tiny_vae, write_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    text_dim = 128
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=pixels // 2,  # tiny_vae halves the side once
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    _perturb(unet, seed + 1)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=text_dim, intermediate_size=4 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )).eval()
    _perturb(text, seed)
    tok_dir = write_clip_tokenizer(out.parent / f"{out.name}-tokenizer-src")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=tiny_vae(seed), text_encoder=text,
                                   tokenizer=CLIPTokenizer.from_pretrained(tok_dir), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def model_folder(model: str, pixels: int) -> Path:
    if model == "toy":
        from ablate_jax import toy

        return Path(toy.shipped_path("pipeline"))
    if model == "small":
        return save_small_pipeline(Path(tempfile.mkdtemp()) / "small", pixels)
    return Path(model)


def image_size(folder: Path) -> int:
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(unet.get("sample_size", 64)) * 2 ** (len(vae["block_out_channels"]) - 1)


def make_images(batch: int, size: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the two sides


# What each --baseline undoes: keyword arguments for the models, and XLA compiler options.
BASELINES = {
    "xla-attention": ({"attention_implementation": "xla"}, {}),
    # XLA's own default list (jaxlib 0.10), which the commands' `-reduce` trims.
    "ynn-reductions": ({}, {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,"
                            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}),
}


def build_jax(folder: Path, batch: int, lr: float, baseline: str | None = None, lower_only: bool = False):
    """``(run, compiled, args)``: ``run()`` does one step and waits for it. ``baseline`` names an
    entry of ``BASELINES`` to build the step with that choice undone. ``lower_only``: return the
    lowered (uncompiled) step instead."""
    import jax
    import numpy as np

    from ablate_jax import checkpointing, losses, sharding
    from ablate_jax import params as params_lib
    from ablate_jax.models import load_pipeline
    from ablate_jax.text_to_image import tokenize
    from ablate_jax.train import make_train_step

    model_kwargs, compiler_options = BASELINES[baseline] if baseline else ({}, {})
    pipe = load_pipeline(folder, **model_kwargs)
    selection = params_lib.selection(pipe.params, "xattn_kv")
    tx = params_lib.optimizer(lr, weight_decay=1e-2, clip_norm=1.0)
    loss_cfg = losses.LossConfig(loss="model_based", teacher="frozen", prior_weight=0.0, preserve_weight=0.0)
    mesh = sharding.make_mesh()  # one CPU device unless --cpu-devices says more
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    base = jax.device_put(pipe.params, rep)
    state = jax.device_put(checkpointing.initial_state(selection.split(pipe.params), tx), rep)
    images = make_images(batch, image_size(folder))
    lat = images.shape[1] // pipe.vae_downsample
    host_batch = {
        "image": images,
        "mask": np.ones((batch, lat, lat, 1), np.float32),
        "target_ids": tokenize(pipe, [TARGET] * batch),
        "anchor_ids": tokenize(pipe, [ANCHOR] * batch),
    }
    dev_batch = {k: jax.device_put(v, data) for k, v in host_batch.items()}
    step_fn = jax.jit(make_train_step(pipe, selection, loss_cfg, tx, seed=0), in_shardings=(rep, rep, data),
                      out_shardings=(rep, rep), donate_argnums=(0,))
    lowered = step_fn.lower(state, base, dev_batch)
    if lower_only:
        return lowered
    compiled = lowered.compile(compiler_options or None)
    box = {"state": state}

    def run() -> float:
        box["state"], metrics = compiled(box["state"], base, dev_batch)
        jax.block_until_ready((box["state"], metrics))
        return float(metrics["loss"])

    return run, compiled, images


def build_torch(folder: Path, batch: int, lr: float, images):
    import torch
    from reference_torch import make_reference_step

    step = make_reference_step(folder, batch, lr)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    targets, anchors = [TARGET] * batch, [ANCHOR] * batch

    def run() -> float:
        return step(x, targets, anchors)

    return run


# ------------------------------------------------------------------------------------------------ measures


def step_flops(folder: Path, batch: int, lr: float) -> float | None:
    """FLOPs of one step by XLA's cost analysis (a dict, or a list of dicts in some jax versions).

    Counted on the step with XLA's plain attention: the query-blocked CPU attention loops over
    blocks, and the cost analysis counts a loop's body once. So these are the model's FLOPs, without
    the probabilities that the blocked backward pass recomputes.
    """
    try:
        cost = build_jax(folder, batch, lr, "xla-attention", lower_only=True).cost_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def xla_memory(compiled) -> float | None:
    """MiB that XLA plans for one step: arguments + outputs + temporaries (aliased buffers once)."""
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    except Exception:  # noqa: BLE001
        return None
    return total / 2**20


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """float32 GFLOP/s of a jitted n x n matmul on this machine (best of ``reps``)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def peak_rss_child(side: str, args: argparse.Namespace, folder: Path) -> float | None:
    """Peak resident MiB of a fresh process that loads one side and runs a few steps.

    One process holds both sides during the timing, so its high-water mark cannot be split
    between them; a child per side gives each its own (model loading and, for JAX, compilation
    included).
    """
    cmd = [sys.executable, __file__, f"--only={side}", f"--model={folder}", f"--batch={args.batch}",
           f"--lr={args.lr}", f"--cpu-devices={args.cpu_devices}"] + ([f"--threads={args.threads}"] if args.threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("peak_rss_mib="):
            return float(line.split("=", 1)[1])
    print(f"(memory child for {side} failed: {out.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
    return None


def peak_rss_mib() -> float:
    """This process's resident high-water mark (VmHWM).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that over from the forking parent into a
    child across exec, so every child would report at least the parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def only_one_side(args: argparse.Namespace) -> None:
    folder = Path(args.model)
    if args.only == "jax":
        run, _, _ = build_jax(folder, args.batch, args.lr)
    else:
        run = build_torch(folder, args.batch, args.lr, make_images(args.batch, image_size(folder)))
    for _ in range(3):
        run()
    print(f"peak_rss_mib={peak_rss_mib():.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy", help="'toy' (the shipped toy model), 'small' (random SD1-shaped at "
                    "1/5 width) or a diffusers folder")
    ap.add_argument("--pixels", type=int, default=32, choices=[32, 64], help="image side for --model=small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per side in each round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (after compiling)")
    ap.add_argument("--cpu-devices", type=int, default=1,
                    help="split the CPU into this many JAX devices, the batch split across them (--cpu_devices)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds of pause before each timed round")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-side peak memory children")
    ap.add_argument("--baseline", action="append", default=[], choices=sorted(BASELINES),
                    help="also time ablate_jax with this CPU choice undone (repeatable)")
    ap.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)  # memory child
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from ablate_jax import distributed

    distributed.tune_cpu_compiler()  # as the package's commands do
    distributed.set_cpu_devices(args.cpu_devices)  # before anything starts JAX
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        only_one_side(args)
        return

    folder = model_folder(args.model, args.pixels)
    t0 = time.perf_counter()
    run_jax, compiled, images = build_jax(folder, args.batch, args.lr)
    compile_s = time.perf_counter() - t0
    run_torch = build_torch(folder, args.batch, args.lr, images)
    sides = {"ablate_jax": run_jax, "torch": run_torch}
    losses = {"ablate_jax": run_jax()}
    for name in args.baseline:
        sides[f"ablate_jax[{name}]"] = build_jax(folder, args.batch, args.lr, name)[0]
        losses[name] = sides[f"ablate_jax[{name}]"]()
    # The same computation either way: the first steps' losses agree to float32 rounding.
    for name in args.baseline:
        print(f"first_loss[{name}]={losses[name]:.6g} (ablate_jax: {losses['ablate_jax']:.6g})")
    for _ in range(args.warmup):
        for fn in sides.values():
            fn()

    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            # Both runtimes' worker threads keep spinning for a while after their last op;
            # a pause lets the other side's threads go idle before the clock starts.
            time.sleep(args.settle)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    sps = {k: 1.0 / float(np.median(v)) for k, v in times.items()}

    flops = step_flops(folder, args.batch, args.lr)
    if flops:
        flops *= jax.device_count()  # the cost analysis counts one device's share of the program
    peak = matmul_gflops()
    mem = {} if args.no_memory else {s: peak_rss_child(s, args, folder) for s in ("jax", "torch")}

    print(f"model={args.model} folder={folder} image={images.shape[1]}px batch={args.batch} params=xattn_kv "
          f"loss=model_based teacher=frozen steps={args.steps} rounds={args.rounds} "
          f"jax_devices={jax.device_count()} torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} load+compile_s={compile_s:.1f}")
    for k, v in sps.items():
        line = f"{k:>10}: {v:8.3f} steps/s (median of {args.rounds} rounds x {args.steps} steps)"
        if flops:
            line += f", {flops * v / 1e9:8.2f} GFLOP/s at XLA's count"
        print(line)
    if flops:
        print(f"flops_per_step={flops / 1e9:.3f} GFLOP (XLA cost analysis of the ablate_jax step, all devices)")
    xm = xla_memory(compiled)
    if xm is not None:
        print(f"xla_planned_memory_mib={xm:.1f} (arguments + outputs + temporaries of the compiled step)")
    for side, v in mem.items():
        if v is not None:
            print(f"peak_rss_mib[{side}]={v:.1f} (a fresh process: load, {'compile, ' if side == 'jax' else ''}3 steps)")
    print(f"matmul_f32_gflops={peak:.1f} (jitted 2048x2048 jnp.dot, best of 10)")
    if flops:
        print(f"ablate_jax_fraction_of_matmul={flops * sps['ablate_jax'] / 1e9 / peak:.3f}")
    for name in args.baseline:
        print(f"change_vs_{name}={sps['ablate_jax'] / sps[f'ablate_jax[{name}]'] - 1:+.1%}")
    print(f"speedup_vs_torch={sps['ablate_jax'] / sps['torch']:.2f}")


if __name__ == "__main__":
    main()
