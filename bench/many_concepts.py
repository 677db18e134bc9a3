"""Several concepts removed from one model, against each removed alone, on the toy world.

    python bench/many_concepts.py [--concepts toy_smiley;toy_striped;toy_memorized] [--config xattn]
                                  [--arg KEY=VALUE,...] [--out many_concepts]

Trains the concepts together (one run, one delta: OUT/together) and each alone (OUT/alone-NAME),
every run from the same anchor sets (one store, OUT/store, drawn once) and evaluated on the same
prompts and seeds, and prints per concept: the target (CLIP accuracy; for a memorized image the
share of samples that copy it), the anchor, and the neighbour that moved most from the base model,
for both. Writes OUT/many_concepts.json and OUT/many_concepts.md. The misspelling sets are left
out (they are no neighbours); every other set of each concept is evaluated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import config_files

NEIGHBOURS = ("preserved", "surrounding")


def summarize(sets: dict[str, Any], memorization: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """Target, anchor and neighbours of one concept's sets (names ``prefix + SET``)."""
    mine = {k[len(prefix):]: v for k, v in sets.items() if k.startswith(prefix)}
    target = next(v for v in mine.values() if v["role"] == "target")
    anchor = next(v for v in mine.values() if v["role"] == "anchor")
    out = {"target": target["clip_accuracy"], "anchor": anchor["clip_accuracy"],
           "neighbours": {k: {"role": v["role"], **v["clip_accuracy"]} for k, v in mine.items() if v["role"] in NEIGHBOURS}}
    if memorization is not None:
        out["target"] = memorization["rate"]
        out["target_measure"] = "copies"
    worst = min(out["neighbours"].items(), key=lambda kv: kv[1]["ablated"] - kv[1]["base"])
    out["worst_neighbour"] = {"set": worst[0], **worst[1], "change": worst[1]["ablated"] - worst[1]["base"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default="toy_smiley;toy_striped;toy_memorized")
    ap.add_argument("--config", default="xattn", help="a config file of configs/ (without .py)")
    ap.add_argument("--arg", default="", help="more key=value pairs for every run")
    ap.add_argument("--out", default="many_concepts")
    args = ap.parse_args()

    from ablate_jax import train
    from ablate_jax.models import load_pipeline
    from ablate_jax.toy import shipped_path

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = f"eval.misspelling=False,anchors.store={out / 'store'}" + (f",{args.arg}" if args.arg else "")
    pipe = load_pipeline(shipped_path("pipeline"))
    names = [n.strip() for n in args.concepts.split(";") if n.strip()]

    together = train.run(config_files.load(args.config, f"concepts={';'.join(names)},{common}"), out / "together",
                         pipeline=pipe, progress=False)
    labels = [c["label"] for c in together["concepts"]]
    rows = []
    for name, label in zip(names, labels, strict=True):
        alone = train.run(config_files.load(args.config, f"concept={name},export.enabled=False,{common}"),
                          out / f"alone-{name}", pipeline=pipe, progress=False)
        rows.append({"concept": name, "label": label,
                     "together": summarize(together["sets"], together.get("memorization", {}).get(label), f"{label}."),
                     "alone": summarize(alone["sets"], alone.get("memorization")),
                     "seconds_alone": {k: round(v, 1) for k, v in alone["timing_s"].items()}})
    result = {"concepts": names, "config": args.config, "arg": args.arg, "rows": rows,
              "seconds_together": {k: round(v, 1) for k, v in together["timing_s"].items()},
              "steps_together": together["train"]["steps"]}
    (out / "many_concepts.json").write_text(json.dumps(result, indent=1) + "\n")

    def pair(p: dict[str, float]) -> str:
        return f"{p['base']:.2f} -> {p['ablated']:.2f}"

    lines = ["| concept | removed | target | anchor | neighbour that moved most | neighbours within 0.05 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for how in ("together", "alone"):
            s = r[how]
            w = s["worst_neighbour"]
            within = all(abs(v["ablated"] - v["base"]) <= 0.05 + 1e-9 for v in s["neighbours"].values())
            unit = " (copies)" if s.get("target_measure") else ""
            lines.append(f"| {r['label'] if how == 'together' else ''} | {how} | {pair(s['target'])}{unit} | "
                         f"{pair(s['anchor'])} | {w['set']} {pair(w)} | {'yes' if within else 'no'} |")
    table = "\n".join(lines)
    (out / "many_concepts.md").write_text(table + "\n")
    print(table)
    print(json.dumps({"together": result["seconds_together"], **{r["label"]: r["seconds_alone"] for r in rows}}))


if __name__ == "__main__":
    main()
