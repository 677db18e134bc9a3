"""Target removal against neighbour retention, over learning rates and steps, with and without
the preservation term, on the toy world's default concept (smiley -> circle).

    python bench/tradeoff.py [--lrs 1e-4,3e-4,1e-3] [--steps 100,300] [--out tradeoff]

Every run shares one anchor set. For each learning rate, preservation weight (0 and the
default's) and step count, a workdir of its own trains from the pretrained model and is
evaluated on the target (smiley), the preserved sibling (frowny) and the held-out siblings
(winky, gaspy). Writes OUT/tradeoff.json and
OUT/tradeoff.png (needs matplotlib: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = "smiley;frowny;winky;gaspy"
HELD_OUT = ("winky", "gaspy")


def load_config(arg: str):
    spec = importlib.util.spec_from_file_location("xattn_config", ROOT / "configs" / "xattn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--steps", default="100,300")
    ap.add_argument("--weight", type=float, default=None, help="preservation weight (default: the config's)")
    ap.add_argument("--out", default="tradeoff")
    args = ap.parse_args()

    from ablate_jax import anchors, train
    from ablate_jax.config import resolve
    from ablate_jax.models import load_pipeline
    from ablate_jax.toy import shipped_path

    lrs = [float(x) for x in args.lrs.split(",")]
    steps = sorted(int(x) for x in args.steps.split(","))
    # The frowny alone is preserved (the preset also keeps the winky), so that two face
    # siblings stay held out for the retention axis.
    common = f"eval.sets={SETS},eval.misspelling=False,export.enabled=False,preserve.concepts=frowny"
    weight = args.weight if args.weight is not None else float(resolve(load_config(common)).preserve.weight)
    pipe = load_pipeline(shipped_path("pipeline"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        anchors = Path(tmp) / "anchors-run"
        anchors.generate_anchors(load_config(common), anchors, pipeline=pipe, progress=False)
        for w in (0.0, weight):
            for lr in lrs:
                for n in steps:
                    workdir = Path(tmp) / f"w{w}-lr{lr}-n{n}"
                    shutil.copytree(anchors / "anchors", workdir / "anchors")
                    config = load_config(f"{common},train.steps={n},train.learning_rate={lr},preserve.weight={w}")
                    report = train.run(config, workdir, pipeline=pipe, progress=False)
                    acc = {k: v["clip_accuracy"] for k, v in report["sets"].items()}
                    row = {"preserve_weight": w, "learning_rate": lr, "steps": n,
                           "target": acc["smiley"], "preserved": acc["frowny"],
                           "held_out": {k: acc[k] for k in HELD_OUT}}
                    row["held_out_retention"] = sum(acc[k]["ablated"] for k in HELD_OUT) / max(
                        sum(acc[k]["base"] for k in HELD_OUT), 1e-9)
                    rows.append(row)
                    print(f"weight {w:g}  lr {lr:g}  steps {n:4d}  smiley {acc['smiley']['base']:.2f} -> "
                          f"{acc['smiley']['ablated']:.2f}  frowny {acc['frowny']['base']:.2f} -> "
                          f"{acc['frowny']['ablated']:.2f}  held-out retention {row['held_out_retention']:.2f}",
                          flush=True)
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
