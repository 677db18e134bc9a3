"""A sweep's training throughput against the same runs one after another, on the toy world.

    python bench/sweep.py [--lrs 1e-4,2e-4,3e-4,6e-4] [--steps 600] [--devices 1] [--eval]

The default config's runs (smiley -> circle, cross-attention keys and values, model-based loss,
frozen teacher, preservation) at each learning rate, trained twice in one process from one
anchor set drawn first into a shared store: one after another with ``ablate_jax.train.run``
(which shares its compiled step between runs that differ only in the rate), then as one
``ablate_jax.sweep`` (one program for all runs). Both times include compilation. Prints each
side's seconds, each run's relative difference between its two trained deltas, and the last
line ``speedup_vs_sequential=<ratio>`` (sequential seconds / sweep seconds: training, and with
``--eval`` evaluation too, where the sweep draws each set's base images once for all runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="1e-4,2e-4,3e-4,6e-4")
    ap.add_argument("--steps", type=int, default=600, help="steps per run (the default config's)")
    ap.add_argument("--devices", type=int, default=1, help="virtual CPU devices (set before jax starts)")
    ap.add_argument("--eval", action="store_true", help="evaluate every run too (the default sets, 20 images each)")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    sys.path.insert(0, str(ROOT / "configs"))

    import numpy as np  # noqa: PLC0415
    import xattn  # noqa: PLC0415

    from ablate_jax import anchors, checkpointing, sweep, train  # noqa: PLC0415
    from ablate_jax.models import load_pipeline  # noqa: PLC0415
    from ablate_jax.toy import shipped_path  # noqa: PLC0415
    from ablate_jax.workdir import open_workdir  # noqa: PLC0415

    lrs = args.lrs.split(",")
    pipe = load_pipeline(shipped_path("pipeline"))
    with tempfile.TemporaryDirectory() as tmp:
        common = (f"train.steps={args.steps},train.checkpoint_every={args.steps},eval.enabled={args.eval},"
                  f"export.enabled=False,anchors.store={tmp}/anchors")
        anchors.generate_anchors(xattn.get_config(common), Path(tmp) / "draw", pipeline=pipe, progress=False)

        t0 = time.perf_counter()
        for lr in lrs:
            train.run(xattn.get_config(f"{common},train.learning_rate={lr}"), Path(tmp) / f"seq-{lr}", pipeline=pipe,
                      progress=False)
        sequential = time.perf_counter() - t0

        t0 = time.perf_counter()
        result = sweep.run(xattn.get_config(common), [f"train.learning_rate={','.join(lrs)}"], Path(tmp) / "sweep",
                           pipeline=pipe, progress=False)
        swept = time.perf_counter() - t0

        print(f"{len(lrs)} runs x {args.steps} steps, batch 8, {args.devices} device(s)")
        print(f"one after another: {sequential:.1f} s; one sweep: {swept:.1f} s (anchors already drawn in both; "
              f"{'training and evaluation' if args.eval else 'training'})")
        for lr, run in zip(lrs, result["runs"], strict=True):
            config = xattn.get_config(f"{common},train.learning_rate={lr}")
            deltas = []
            for wd in (Path(tmp) / f"seq-{lr}", run["workdir"]):
                w = open_workdir(config, wd)
                sel = checkpointing.selection_for(w.spec.config, pipe, w.spec.concept)
                trained, base = sel.split(checkpointing.restore_ablated_params(w, pipe, sel)), sel.split(pipe.params)
                deltas.append({k: np.asarray(trained[k]) - np.asarray(base[k]) for k in trained})
            a, b = deltas
            err = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a) / sum(np.sum(a[k] ** 2) for k in a))
            print(f"learning rate {lr}: sweep delta vs its run alone, relative error {err:.2e}")
    print(f"speedup_vs_sequential={sequential / swept:.2f}")


if __name__ == "__main__":
    main()
