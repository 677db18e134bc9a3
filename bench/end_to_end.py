"""Wall time of the whole job by stage, ablate_jax against the same job written with diffusers.

    python bench/end_to_end.py [--config configs/xattn.py] [--arg preserve.weight=0] [--no-reference]
                               [--compilation-cache DIR] [--cpu-devices N]

Runs anchors -> train -> evaluate -> export in a fresh temporary workdir, then the reference job
(bench/reference_torch.py: the same number of anchor images with the same sampler, steps and
guidance; the same number of train steps at the same batch; the same evaluation sets, images
per set, sampler and steps, with CLIP scoring) in the same process, and prints each stage's
seconds for both and the ratio. The reference has no preservation term, so compare with
``--arg preserve.weight=0`` for the same training work (the default config preserves a sibling).

Without ``--compilation-cache`` every program is compiled afresh, as on a first run. With it,
compiled programs are read from and written to DIR, as the commands do by default
(``--compilation_cache``): run it twice to time a job whose programs are already compiled.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import config_files

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "xattn.py"))
    ap.add_argument("--arg", default=None, help="the config's arg string, e.g. concept=toy_striped")
    ap.add_argument("--no-reference", action="store_true", help="time ablate_jax alone")
    ap.add_argument("--compilation-cache", default=None, help="keep compiled programs in this folder")
    ap.add_argument("--cpu-devices", type=int, default=None, help="split the CPU into this many JAX devices")
    args = ap.parse_args()

    import jax

    from ablate_jax import distributed, train

    distributed.tune_cpu_compiler()  # as the train command does
    if args.cpu_devices is not None:
        distributed.set_cpu_devices(args.cpu_devices)  # before anything starts JAX
    distributed.use_compilation_cache(args.compilation_cache)

    from ablate_jax.config import resolve  # noqa: PLC0415

    config = resolve(config_files.load(args.config, args.arg))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = train.run(config, Path(tmp) / "run", progress=False)
        total = time.perf_counter() - t0
    timing = {k: round(v, 1) for k, v in report.get("timing_s", {}).items()}
    result = {"config": Path(args.config).name, "arg": args.arg, "devices": jax.device_count(),
              "compilation_cache": args.compilation_cache,
              "backend": jax.default_backend(), "stages_s": timing, "total_s": round(total, 1)}
    if not args.no_reference:
        result["reference_stages_s"], result["reference_clip_scores"] = run_reference(config)
        ref = result["reference_stages_s"]
        result["reference_total_s"] = round(sum(ref.values()), 1)
        print(f"{'stage':8} {'ablate_jax s':>12} {'diffusers s':>12} {'ratio':>7}")
        for stage in ("anchors", "train", "eval"):
            print(f"{stage:8} {timing[stage]:12.1f} {ref[stage]:12.1f} {ref[stage] / timing[stage]:7.2f}")
        same = sum(timing[k] for k in ref)
        print(f"{'total':8} {same:12.1f} {result['reference_total_s']:12.1f} {result['reference_total_s'] / same:7.2f}")
        result["speedup_vs_torch"] = round(result["reference_total_s"] / same, 2)
    print(json.dumps(result, indent=1))
    if "speedup_vs_torch" in result:
        print(f"speedup_vs_torch={result['speedup_vs_torch']}")


def run_reference(config) -> tuple[dict[str, float], list[float]]:
    """The reference job with the config's sizes; seconds per stage (rounded) and CLIP scores."""
    import sys  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ablate_jax import evaluate  # noqa: PLC0415
    from ablate_jax.config import prepare  # noqa: PLC0415

    sys.path.insert(0, str(ROOT / "bench"))
    from reference_torch import reference_job  # noqa: PLC0415

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = prepare(config)
    concept, phrase = spec.concept, spec.evaluator_family.evaluator_phrase
    n = int(config.eval.num_images)
    sets = list(concept.eval_sets)  # misspellings of the target included
    eval_sets = [(evaluate.set_prompts(s, n), phrase(s.concept)) for s in sets]
    import jax  # noqa: PLC0415

    stages, scores = reference_job(
        spec.model_path, spec.evaluator_path,
        anchor_prompts=concept.usable_anchor_prompts(), num_anchors=int(config.anchors.num_images),
        anchor_steps=int(config.anchors.steps), anchor_guidance=float(config.anchors.guidance),
        anchor_batch=int(config.anchors.batch_size) * jax.device_count(), train_steps=int(config.train.steps),
        batch_size=int(config.train.batch_size), lr=float(config.train.learning_rate), target=concept.targets[0],
        anchor=concept.anchor, eval_sets=eval_sets, eval_steps=int(config.eval.steps), eval_eta=float(config.eval.eta),
        eval_guidance=float(config.eval.guidance), eval_batch=int(config.eval.batch_size), seed=int(config.seed))
    return {k: round(v, 1) for k, v in stages.items()}, [round(x, 4) for x in scores]


if __name__ == "__main__":
    main()
