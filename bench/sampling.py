"""Images per second: ablate_jax's compiled sampler against diffusers' PyTorch pipeline.

Both run the same weights, sampler, steps, guidance and batch on this machine's CPU, in one
process, alternating rounds so that machine noise hits both alike. The last line is
``speedup_vs_torch=<x>`` (ablate_jax images/s divided by PyTorch images/s).

    make bench                      # or: .venv/bin/python bench/sampling.py --model=small --batch=8

``--baseline=xla-attention`` adds an ablate_jax side with JAX's plain XLA attention instead of the
query-blocked CPU attention, timed in the same alternation; it prints ``change_vs_xla-attention=``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny reference models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy",
                    help="'toy' (the shipped toy model), 'tiny' or 'small' (random SD1-shaped) or a diffusers folder")
    ap.add_argument("--sampler", default="dpmpp_2m", choices=["ddim", "dpmpp_2m"])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-devices", type=int, default=1,
                    help="split the CPU into this many JAX devices (the train command's --cpu_devices)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds of pause before each timed round")
    ap.add_argument("--baseline", action="append", default=[], choices=["xla-attention"],
                    help="also time ablate_jax with this CPU choice undone")
    args = ap.parse_args()

    import jax

    from ablate_jax import distributed

    distributed.tune_cpu_compiler()  # as the package's commands do
    distributed.set_cpu_devices(args.cpu_devices)  # before anything starts JAX
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ablate_jax import sharding
    from ablate_jax.models import load_pipeline
    from ablate_jax.text_to_image import SamplingConfig, draw

    if args.model in ("tiny", "small"):
        from tiny_models import save_tiny_pipeline

        path = save_tiny_pipeline(Path(tempfile.mkdtemp()) / args.model, kind="sd1", size=args.model)
    elif args.model == "toy":
        from ablate_jax import toy

        path = toy.shipped_path("pipeline")
    else:
        path = Path(args.model)

    # XLA's CPU code flushes subnormal floats to zero; PyTorch's does only when asked. Without
    # this the reference runs several times slower on the toy model's tiny values, which would
    # measure denormal arithmetic rather than the sampler (the train-step benchmark does the same).
    torch.set_flush_denormal(True)
    pipe = load_pipeline(path)
    ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    sched_cls = DDIMScheduler if args.sampler == "ddim" else DPMSolverMultistepScheduler
    ref.scheduler = sched_cls.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    prompts = [f"a photo of a cat, variation {i}" for i in range(args.batch)]
    cfg = SamplingConfig(sampler=args.sampler, num_steps=args.steps, guidance_scale=args.guidance)
    # The comparison is per machine: PyTorch uses all cores in one process, ablate_jax one device
    # or (--cpu-devices) a device per core.
    mesh = sharding.make_mesh(jax.devices())

    def jax_side(pipe):
        def run() -> np.ndarray:
            return draw(pipe, pipe.params, prompts, jax.random.key(0), cfg, mesh=mesh, batch_size=args.batch)

        return run

    run_jax = jax_side(pipe)

    def run_torch() -> None:
        with torch.no_grad():
            ref(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np")

    sides = {"ablate_jax": run_jax, "torch": run_torch}
    for name in args.baseline:
        sides[f"ablate_jax[{name}]"] = jax_side(load_pipeline(path, attention_implementation="xla"))
    # Compile once, outside the timed rounds; a baseline draws the same images to float32 rounding.
    first = {name: fn() for name, fn in sides.items()}
    for name in args.baseline:
        diff = np.abs(np.asarray(first[f"ablate_jax[{name}]"], np.float32) - np.asarray(first["ablate_jax"], np.float32))
        print(f"max_pixel_difference[{name}]={diff.max():.0f} (of 255)")
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            time.sleep(args.settle)  # the other side's worker threads spin on for a while after its last op
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ips = {k: args.batch / float(np.median(v)) for k, v in times.items()}
    print(f"model={args.model} sampler={args.sampler} steps={args.steps} guidance={args.guidance} batch={args.batch} "
          f"jax_devices={jax.device_count()} torch_threads={torch.get_num_threads()}")
    for k, v in ips.items():
        print(f"{k:>10}: {v:8.2f} images/s (median of {args.rounds})")
    for name in args.baseline:
        print(f"change_vs_{name}={ips['ablate_jax'] / ips[f'ablate_jax[{name}]'] - 1:+.1%}")
    print(f"speedup_vs_torch={ips['ablate_jax'] / ips['torch']:.2f}")


if __name__ == "__main__":
    main()
