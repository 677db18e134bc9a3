"""Target removal against neighbour retention, over learning rates and steps, with and without
the preservation term, on the toy world's default concept (smiley -> circle).

    python bench/tradeoff.py [--lrs 1e-4,3e-4,1e-3] [--steps 100,300] [--out tradeoff]

One sweep (:mod:`ablate_jax.sweep`, in OUT/sweep): every learning rate x step count x
preservation weight (0 and the default's) trains from the pretrained model on one anchor set
(runs with the same weight in one program) and is evaluated on the target (smiley), the
preserved sibling (frowny) and the held-out siblings (winky, gaspy). Writes OUT/tradeoff.json
and OUT/tradeoff.png (needs matplotlib: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import config_files

SETS = "smiley;frowny;winky;gaspy"
HELD_OUT = ("winky", "gaspy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--steps", default="100,300")
    ap.add_argument("--weight", type=float, default=None, help="preservation weight (default: the config's)")
    ap.add_argument("--out", default="tradeoff")
    args = ap.parse_args()

    from ablate_jax import sweep
    from ablate_jax.config import resolve
    from ablate_jax.models import load_pipeline
    from ablate_jax.toy import shipped_path

    # The frowny alone is preserved (the preset also keeps the winky), so that two face
    # siblings stay held out for the retention axis.
    common = f"eval.sets={SETS},eval.misspelling=False,export.enabled=False,preserve.concepts=frowny"
    if args.weight is not None:
        weight = args.weight
    else:
        weight = float(resolve(config_files.load("xattn", common)).preserve.weight)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    axes = [f"preserve.weight=0,{weight:g}", f"train.learning_rate={args.lrs}", f"train.steps={args.steps}"]
    result = sweep.run(config_files.load("xattn", common), axes, out / "sweep",
                       pipeline=load_pipeline(shipped_path("pipeline")), progress=False)
    rows = []
    for run in result["runs"]:
        if "sets" not in run:
            print(f"{run['name']}: {run['train'].get('failed')}")
            continue
        acc = run["sets"]
        v = run["values"]
        row = {"preserve_weight": float(v["preserve.weight"]), "learning_rate": float(v["train.learning_rate"]),
               "steps": int(v["train.steps"]),
               "target": {k: acc["smiley"][k] for k in ("base", "ablated")},
               "preserved": {k: acc["frowny"][k] for k in ("base", "ablated")},
               "held_out": {s: {k: acc[s][k] for k in ("base", "ablated")} for s in HELD_OUT}}
        row["held_out_retention"] = sum(acc[k]["ablated"] for k in HELD_OUT) / max(
            sum(acc[k]["base"] for k in HELD_OUT), 1e-9)
        rows.append(row)
        print(f"weight {row['preserve_weight']:g}  lr {row['learning_rate']:g}  steps {row['steps']:4d}  smiley "
              f"{row['target']['base']:.2f} -> {row['target']['ablated']:.2f}  frowny {row['preserved']['base']:.2f} "
              f"-> {row['preserved']['ablated']:.2f}  held-out retention {row['held_out_retention']:.2f}", flush=True)
    (out / "tradeoff.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "tradeoff.png")
    print(f"wrote {out / 'tradeoff.json'} and {out / 'tradeoff.png'}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for w, colour in zip(sorted({r["preserve_weight"] for r in rows}), ("tab:red", "tab:blue"), strict=False):
        mine = [r for r in rows if r["preserve_weight"] == w]
        label = "no preservation" if w == 0 else f"preservation (frowny), weight {w:g}"
        xs = [1 - r["target"]["ablated"] for r in mine]
        ys = [r["held_out_retention"] for r in mine]
        ax.scatter(xs, ys, color=colour, label=label, s=40)
        for r, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(f"{r['learning_rate']:g}/{r['steps']}", (x, y), textcoords="offset points", xytext=(4, 3),
                        fontsize=7, color=colour)
    ax.set_xlabel("target removed: 1 - CLIP accuracy on smiley prompts")
    ax.set_ylabel("held-out siblings kept (winky, gaspy): ablated / base accuracy")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.15)
    ax.axvline(0.9, color="grey", lw=0.5, ls="--")
    ax.axhline(1.0, color="grey", lw=0.5, ls="--")
    ax.set_title("smiley -> circle on the toy world (labels: learning rate / steps)", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
