"""Rendering of an evaluation report: the schema check, report.json, report.md, the terminal
table and the before/after image grids.

The report (docs/design.md, "Evaluation") is a plain dict, built by :func:`ablate_jax.evaluate.evaluate_run`::

    {"concept": {"kind", "targets", "anchor", "preserve", "preset"},  # or, several concepts removed at once:
     "concepts": [{"label", "kind", "targets", "anchor", "preserve", "preset"}, ...],
     "settings": {"model", "clip", "seed", "num_images", "sampler", "steps", "guidance", "eta", "base_only"},
     "sets": {NAME: {"role", "concept", "n_images",
                     "clip_score": {"base", "ablated"}, "clip_accuracy": {"base", "ablated"},
                     "anchor_rate": {"base", "ablated"},      # target and target_paraphrase sets only
                     "kid": f,
                     "group": LABEL}},                        # several concepts: NAME is LABEL.SET
     "memorization": {"method", "threshold", "sets", "n_images", "rate": {"base", "ablated"},
                      "similarity": {"base", "ablated"}},      # memorization concepts only
                                                               # (several concepts: {LABEL: {...}})
     "attacks": {NAME: {"kind", "n_images", "success_rate": {"base", "ablated"},
                        "detail": {"base", "ablated"}, "prompt"}},  # when attacks were run (+ "group")
     "timing_s": {"eval": f}}

Every "ablated" value and "kid" are ``None`` in a base-only report. ``settings`` (how the images
were drawn) and ``anchor_rate`` (the fraction of images CLIP reads as the anchor rather than the
target: the success measure of an ablation, ``1 - clip_accuracy`` up to ties) are the only keys
beyond the design's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ablate_jax import storage
from ablate_jax.concepts import ROLES
from ablate_jax.config import ATTACKS

# An attack's kind, or ``control``: the search's prefix without the target's name (ablate_jax.attacks).
ATTACK_KINDS = (*ATTACKS, "control")

MODELS = ("base", "ablated")
TARGET_ROLES = ("target", "target_paraphrase")

# ------------------------------------------------------------------------------------------------ schema


def _check_pair(where: str, pair: Any, base_only: bool, unit: bool) -> None:
    if not isinstance(pair, Mapping) or set(pair) != set(MODELS):
        raise ValueError(f"{where} must be {{'base': ..., 'ablated': ...}}, got {pair!r}")
    for model in MODELS:
        value = pair[model]
        if model == "ablated" and base_only:
            if value is not None:
                raise ValueError(f"{where}.ablated must be null in a base-only report")
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
            raise ValueError(f"{where}.{model} must be a finite number, got {value!r}")
        if unit and not 0.0 <= value <= 1.0:
            raise ValueError(f"{where}.{model} must lie in [0, 1], got {value}")


def check_report(report: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` naming the first field of ``report`` that does not follow the schema."""
    for key in ("settings", "sets", "timing_s"):
        if key not in report:
            raise ValueError(f"report has no {key!r}")
    if ("concept" in report) == ("concepts" in report):
        raise ValueError("a report has either 'concept' (one concept removed) or 'concepts' (several)")
    several = "concepts" in report
    removed = report["concepts"] if several else [report["concept"]]
    if several and (not isinstance(removed, list) or len(removed) < 2):
        raise ValueError("concepts must list two or more concepts")
    for i, concept in enumerate(removed):
        where = f"concepts[{i}]" if several else "concept"
        for key, kind in (("kind", str), ("targets", list), ("anchor", str), ("preserve", list)):
            if not isinstance(concept.get(key), kind):
                raise ValueError(f"{where}.{key} must be a {kind.__name__}")
        if several and not isinstance(concept.get("label"), str):
            raise ValueError(f"{where}.label must be a string")
    labels = [c["label"] for c in removed] if several else []
    base_only = report["settings"].get("base_only")
    if not isinstance(base_only, bool):
        raise ValueError("settings.base_only must be a bool")
    if not isinstance(report["sets"], Mapping) or not report["sets"]:
        raise ValueError("report has no evaluation sets")
    for name, s in report["sets"].items():
        where = f"sets.{name}"
        if s.get("role") not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {s.get('role')!r}")
        if not isinstance(s.get("concept"), str) or not s["concept"]:
            raise ValueError(f"{where}.concept must be a non-empty string")
        if not isinstance(s.get("n_images"), int) or s["n_images"] < 1:
            raise ValueError(f"{where}.n_images must be a positive int")
        if several and (s.get("group") not in labels or not name.startswith(f"{s['group']}.")):
            raise ValueError(f"{where}.group must be the label of its concept, which the set's name starts with")
        _check_pair(f"{where}.clip_score", s.get("clip_score"), base_only, unit=False)
        if not all(0.0 <= v <= 2.5 for v in s["clip_score"].values() if v is not None):
            raise ValueError(f"{where}.clip_score must lie in [0, 2.5]")
        _check_pair(f"{where}.clip_accuracy", s.get("clip_accuracy"), base_only, unit=True)
        if s["role"] in TARGET_ROLES:
            _check_pair(f"{where}.anchor_rate", s.get("anchor_rate"), base_only, unit=True)
        elif "anchor_rate" in s:
            raise ValueError(f"{where}.anchor_rate belongs to target sets only")
        kid = s.get("kid", "missing")
        if base_only and kid is not None:
            raise ValueError(f"{where}.kid must be null in a base-only report")
        if not base_only and (not isinstance(kid, float) or not np.isfinite(kid)):
            raise ValueError(f"{where}.kid must be a finite number, got {kid!r}")
    mem = report.get("memorization")
    if several:
        memorizing = {c["label"] for c in removed if c["kind"] == "memorization"}
        blocks = dict(mem or {})
        evaluated = {s["group"] for s in report["sets"].values()}
        if not set(blocks) <= memorizing or not memorizing & evaluated <= set(blocks):
            raise ValueError("memorization holds one block per memorization concept evaluated, by label")
    else:
        if (removed[0]["kind"] == "memorization") != (mem is not None):
            raise ValueError("a memorization block belongs to (and only to) memorization concepts")
        blocks = {"": mem} if mem is not None else {}
    for label, block in blocks.items():
        where = f"memorization.{label}" if label else "memorization"
        for key in ("method", "threshold", "sets", "n_images"):
            if key not in block:
                raise ValueError(f"{where} has no {key!r}")
        _check_pair(f"{where}.rate", block.get("rate"), base_only, unit=True)
        _check_pair(f"{where}.similarity", block.get("similarity"), base_only, unit=False)
    attacks = report.get("attacks")
    if attacks is not None:
        if not isinstance(attacks, Mapping) or not attacks:
            raise ValueError("attacks must map attack names to their results")
        for name, a in attacks.items():
            if a.get("kind") not in ATTACK_KINDS:
                raise ValueError(f"attacks.{name}.kind must be one of {', '.join(ATTACK_KINDS)}, got {a.get('kind')!r}")
            if not isinstance(a.get("n_images"), int) or a["n_images"] < 1:
                raise ValueError(f"attacks.{name}.n_images must be a positive int")
            _check_pair(f"attacks.{name}.success_rate", a.get("success_rate"), base_only, unit=True)
            if not isinstance(a.get("prompt"), str):
                raise ValueError(f"attacks.{name}.prompt must be a string")
    timing = report["timing_s"]
    if not isinstance(timing, Mapping) or not all(isinstance(v, (int, float)) and v >= 0 for v in timing.values()):
        raise ValueError("timing_s must map phase names to non-negative seconds")


# ------------------------------------------------------------------------------------------------ tables


def _pair(pair: Mapping[str, Any] | None, fmt: str, base_only: bool) -> str:
    if pair is None:
        return "-"
    if base_only:
        return format(pair["base"], fmt)
    return f"{pair['base']:{fmt}} -> {pair['ablated']:{fmt}}"


def _rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    base_only = report["settings"]["base_only"]
    what = "base" if base_only else "base -> ablated"
    header = ["set", "role", "concept", f"CLIP score ({what})", f"CLIP accuracy ({what})", f"anchor rate ({what})"]
    if not base_only:
        header.append("KID")
    rows = []
    for name, s in report["sets"].items():
        row = [name, s["role"], s["concept"], _pair(s["clip_score"], ".3f", base_only),
               _pair(s["clip_accuracy"], ".2f", base_only), _pair(s.get("anchor_rate"), ".2f", base_only)]
        if not base_only:
            row.append(f"{s['kid']:.5f}")
        rows.append(row)
    return header, rows


def _memorization_line(report: Mapping[str, Any]) -> str | None:
    mem = report.get("memorization")
    if mem is None:
        return None
    blocks = mem if "concepts" in report else {"": mem}
    lines = []
    for label, block in blocks.items():
        detector = "toy-world copy detector" if block["method"] == "toy_world" else "CLIP image cosine"
        rate = _pair(block["rate"], ".2f", report["settings"]["base_only"])
        lines.append(f"Memorization{f' ({label})' if label else ''}: {rate} of {block['n_images']} images from the "
                     f"memorized caption reproduce the memorized image ({detector} > {block['threshold']:g}).")
    return "\n".join(lines)


def _attack_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    base_only = report["settings"]["base_only"]
    what = "base" if base_only else "base -> ablated"
    header = ["attack", "kind", f"success rate ({what})", "example prompt (ablated)"]
    rows = [[name, a["kind"], _pair(a["success_rate"], ".2f", base_only), a["prompt"]]
            for name, a in report.get("attacks", {}).items()]
    return header, rows


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(report: Mapping[str, Any]) -> str:
    """The report as aligned plain-text tables for a terminal (sets, memorization line, attacks)."""
    lines = _aligned(*_rows(report))
    mem = _memorization_line(report)
    if mem:
        lines.append(mem)
    if report.get("attacks"):
        lines += ["", *_aligned(*_attack_rows(report))]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("->", "→")


def format_markdown(report: Mapping[str, Any]) -> str:
    """report.md: what was evaluated, the table, the memorization line and how to read them."""
    st = report["settings"]

    def describe(c: Mapping[str, Any]) -> str:
        targets = ", ".join(f"`{t}`" for t in c["targets"])
        return (f"({c['kind']}): {targets} → anchor `{c['anchor']}`"
                + (f", preserving {', '.join(f'`{p}`' for p in c['preserve'])}" if c["preserve"] else ""))

    if "concepts" in report:
        about = ["Concepts removed together, each set named `CONCEPT.SET`:"] + [
            f"- {c['label']} {describe(c)}" for c in report["concepts"]] + [""]
    else:
        about = [f"Concept {describe(report['concept'])}."]
    lines = [
        "# Evaluation report",
        "",
        *about,
        f"Model `{st['model']}`, evaluator CLIP `{st['clip']}`; {st['num_images']} images per set, "
        f"{st['sampler']} {st['steps']} steps, guidance {st['guidance']:g}, eta {st['eta']:g}, seed {st['seed']}"
        + ("; base model only." if st["base_only"] else "; base and ablated images share prompts and seeds."),
        "",
    ]
    header, rows = _rows(report)
    lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md_cell(x) for x in row) + " |" for row in rows]
    mem = _memorization_line(report)
    if mem:
        lines += ["", _md_cell(mem)]
    if report.get("attacks"):
        header, rows = _attack_rows(report)
        lines += ["", "Attacks (success rate: the fraction of images the evaluator reads as the target rather than the "
                  "anchor or a neighbour, on seeds the attacks never saw):", "",
                  "| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(_md_cell(x) for x in row) + " |" for row in rows]
    lines += [
        "",
        'CLIP score: 2.5 * max(cos(image, "A photo depicts {concept}"), 0), averaged. CLIP accuracy: the fraction '
        "of images that score higher for the set's concept than for the anchor (on the anchor set: than for the "
        "target). Anchor rate (target sets): the fraction that score higher for the anchor than for the target. "
        "KID: between the ablated and the base images' CLIP features, pairs of one seed left out of the cross "
        "term (0: unchanged; it can dip slightly below 0 by chance).",
        "",
        "Grids: " + ", ".join(f"[{n}]({grid_filename(n)})" for n in report["sets"])
        + "".join(f", [attack {n}]({grid_filename('attack_' + n)})" for n in report.get("attacks", {})) + ".",
        "",
        "Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timing_s"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> None:
    """Writes ``report.json`` and ``report.md`` in ``out_dir`` (each atomically)."""
    out = storage.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage.write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    storage.write_text(out / "report.md", format_markdown(report))


# ------------------------------------------------------------------------------------------------ grids

PAD = 4  # outer margin
SPACE = 2  # between tiles
GAP = 12  # between the base and the ablated block
HEADER = 16  # the "base" / "ablated" labels
CAPTION = 14  # the prompt above each row
MIN_TILE = 96  # smaller images are enlarged (nearest neighbour) to at least this side
MAX_TILE = 256  # larger images are shrunk to this side
MIN_WIDTH = 320  # leaves room for the prompt captions
MAX_ROWS = 8


def grid_filename(set_name: str) -> str:
    return re.sub(r"[^\w.-]", "_", set_name) + ".png"


def tile_size(image_side: int) -> int:
    """Side of one grid tile for images of ``image_side`` pixels."""
    if image_side < MIN_TILE:
        return image_side * -(-MIN_TILE // image_side)  # an integer factor keeps pixels square
    return min(image_side, MAX_TILE)


def grid_rows(prompts: Sequence[str], columns: int, max_rows: int = MAX_ROWS) -> list[tuple[str, list[int]]]:
    """``(prompt, image indices)`` per grid row: one row per distinct prompt (first ``max_rows``);
    a set with few distinct prompts gets several rows per prompt, up to ``columns`` images each."""
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    per_prompt = max(1, max_rows // len(by_prompt))
    rows = []
    for p, idx in by_prompt.items():
        for r in range(per_prompt):
            chunk = idx[r * columns : (r + 1) * columns]
            if chunk and len(rows) < max_rows:
                rows.append((p, chunk))
    return rows


def grid_size(n_rows: int, columns: int, tile: int, sides: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a grid of ``n_rows`` rows of ``columns`` tiles per side."""
    block = columns * tile + (columns - 1) * SPACE
    width = max(MIN_WIDTH, 2 * PAD + sides * block + (sides - 1) * GAP)
    height = 2 * PAD + HEADER + n_rows * (CAPTION + tile) + (n_rows - 1) * SPACE
    return width, height


def _fit(text: str, draw: ImageDraw.ImageDraw, font: Any, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def before_after_grid(
    base: np.ndarray, ablated: np.ndarray | None, prompts: Sequence[str], columns: int = 4
) -> Image.Image:
    """A labelled grid: a row per prompt, base images on the left, the same seeds' ablated images on the right.

    ``base`` and ``ablated``: uint8 ``[N, H, W, 3]`` (``ablated`` None: a base-only grid);
    ``prompts[i]`` is image ``i``'s prompt.
    """
    if len(prompts) != len(base) or (ablated is not None and ablated.shape != base.shape):
        raise ValueError("base, ablated and prompts must describe the same images")
    sides = [("base", base)] + ([("ablated", ablated)] if ablated is not None else [])
    rows = grid_rows(prompts, columns)
    cols = max(len(idx) for _, idx in rows)
    side = base.shape[1]
    tile = tile_size(side)
    width, height = grid_size(len(rows), cols, tile, len(sides))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    block = cols * tile + (cols - 1) * SPACE
    for s, (label, _) in enumerate(sides):
        draw.text((PAD + s * (block + GAP), PAD), label, fill="black", font=font)
    y = PAD + HEADER
    for prompt, idx in rows:
        draw.text((PAD, y), _fit(prompt, draw, font, width - 2 * PAD), fill=(60, 60, 60), font=font)
        y += CAPTION
        for s, (_, images) in enumerate(sides):
            for c, i in enumerate(idx):
                resample = Image.NEAREST if tile >= side else Image.LANCZOS
                im = Image.fromarray(images[i]).resize((tile, tile), resample)
                canvas.paste(im, (PAD + s * (block + GAP) + c * (tile + SPACE), y))
        y += tile + SPACE
    return canvas
