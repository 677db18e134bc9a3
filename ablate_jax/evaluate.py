"""Measures of what an ablation removed and what it kept (docs/design.md, "Evaluation"), and the
evaluation of a run against its base model.

- CLIP score: ``2.5 * max(cos(image, text), 0)`` with the text "A photo depicts {concept}";
- CLIP accuracy: the fraction of images whose score for a set's concept beats the score for
  the concept it is compared with (the anchor, or for the anchor set the target);
- KID: unbiased polynomial-kernel MMD between two sets of CLIP image features;
- memorization: the fraction of samples of the memorized caption that copy the memorized image;
- zero-shot classification among a list of concepts (used to check the toy world).

:func:`evaluate_run` draws every evaluation set with the base and the ablated parameters
(same prompts, same seeds), measures both and writes ``eval/report.json``, ``eval/report.md``
and a before/after grid per set (rendering and the schema are in :mod:`ablate_jax.report`)::

    python -m ablate_jax.evaluate --config=configs/xattn.py --workdir=runs/smiley [--base_only] [--attacks]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ablate_jax import attacks, cli, concepts, memorization, sharding, storage
from ablate_jax import config as config_lib
from ablate_jax.clip_features import image_embeddings, text_embeddings
from ablate_jax.config import Spec, eval_sampling, prepare
from ablate_jax.config import attack_kinds as attack_kinds_of
from ablate_jax.models.loading import CLIP, Pipeline, load_clip, load_pipeline
from ablate_jax.report import before_after_grid, check_report, format_table, grid_filename, write_report
from ablate_jax.text_to_image import SamplingConfig, draw
from ablate_jax.workdir import Workdir

__all__ = [
    "EVAL_TEMPLATE", "EvalError", "check_report", "clip_accuracy", "clip_scores", "concept_text", "evaluate_run",
    "format_table", "kid", "set_key", "set_prompts", "write_report", "zero_shot",
]

log = logging.getLogger(__name__)

EVAL_TEMPLATE = "A photo depicts {}"


def concept_text(concept: str) -> str:
    return EVAL_TEMPLATE.format(concept)


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """``2.5 * max(cos, 0)`` for every image and text: ``[N_images, N_texts]``."""
    return 2.5 * np.maximum(image_emb @ text_emb.T, 0.0)


def clip_accuracy(image_emb: np.ndarray, concept_emb: np.ndarray, other_emb: np.ndarray) -> float:
    """Fraction of images that score higher for the concept than for the other concept (ties count as misses)."""
    s = clip_scores(image_emb, np.stack([concept_emb, other_emb]))
    return float(np.mean(s[:, 0] > s[:, 1]))


def zero_shot(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Index of the best-matching class text for each image: ``[N]``."""
    return np.argmax(image_emb @ class_emb.T, axis=1)


def kid(x: np.ndarray, y: np.ndarray, subsets: int = 50, subset_size: int = 100, seed: int = 0,
        paired: bool = False) -> float:
    """Kernel inception distance between feature sets ``x [N, D]`` and ``y [M, D]``.

    The unbiased MMD^2 with the cubic polynomial kernel ``(x.y / D + 1)^3``, averaged over random
    subsets of ``min(subset_size, N, M)`` rows of each.

    ``paired``: row ``i`` of ``x`` and of ``y`` belong together (the same seed drawn by two models;
    needs ``N == M``). Then each subset takes the same rows of both, and the cross term leaves out
    the pairs ``(i, i)``: they are not independent draws, and with them a set compared with itself
    scores below zero. Without them the estimate is still unbiased, and exactly 0 for ``x == y``.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if paired and len(x) != len(y):
        raise ValueError(f"paired KID needs as many rows in each set, got {len(x)} and {len(y)}")
    d = x.shape[1]
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    if m == len(x) == len(y):
        subsets = 1  # every subset would hold all rows, and the estimate ignores their order
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        rows = rng.choice(len(x), m, replace=False)
        a = x[rows]
        b = y[rows if paired else rng.choice(len(y), m, replace=False)]
        # Every kernel block goes through the same general matrix product: for ``a @ a.T`` numpy would
        # pick BLAS's symmetric routine, which rounds differently from the ``a @ b.T`` of the cross
        # term, and a set compared with itself would miss 0 by ~1e-16.
        kxx, kyy, kxy = ((p @ np.ascontiguousarray(q.T) / d + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        cross = (kxy.sum() - np.trace(kxy)) / (m * (m - 1)) if paired else kxy.mean()
        total += (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * cross
    return float(total / subsets)


# ------------------------------------------------------------------------------------------------ a run

# Evaluation noise comes from fold_in(key(seed), EVAL_STREAM): a stream of its own, so evaluation
# images never repeat the anchor (training) images drawn from the same seed.
EVAL_STREAM = 0x6576616C  # "eval" in ASCII


class EvalError(ValueError):
    """An evaluation that cannot run as configured; the message says why."""


def set_key(seed: int, set_name: str) -> jax.Array:
    """The sampling key of one evaluation set.

    Keyed by the set's name, not its position, so a set's images do not depend on which other
    sets are evaluated (``eval.sets``) or on sets a caller adds.
    """
    key = jax.random.fold_in(jax.random.key(seed), EVAL_STREAM)
    return jax.random.fold_in(key, zlib.crc32(set_name.encode()) & 0x7FFFFFFF)


def set_prompts(eval_set: concepts.EvalSet, n: int) -> list[str]:
    """The prompt of each of ``n`` images: image ``j`` uses prompt ``j % len(prompts)``."""
    return [eval_set.prompts[j % len(eval_set.prompts)] for j in range(n)]


def _select_sets(concept: concepts.Concept, names: str, extra: Sequence[concepts.EvalSet], *,
                 allow_none: bool = False) -> list[concepts.EvalSet]:
    """The sets ``names`` picks (all when empty), then ``extra``; ``allow_none``: a concept of a run of
    several that ``eval.sets`` picks nothing of is left out."""
    available = {s.name: s for s in concept.eval_sets}
    wanted = [n.strip() for n in names.split(";") if n.strip()]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise EvalError(f"unknown evaluation set {unknown[0]!r}; the concept has {', '.join(available) or 'none'}")
    if allow_none and not wanted:
        return []
    sets = [available[n] for n in wanted] if wanted else list(concept.eval_sets)
    for s in extra:
        if s.role not in concepts.ROLES:
            raise EvalError(f"evaluation set {s.name!r}: role must be one of {', '.join(concepts.ROLES)}, got {s.role!r}")
        if s.name in {t.name for t in sets}:
            raise EvalError(f"evaluation set {s.name!r} is given twice")
        sets.append(s)
    if not sets:
        raise EvalError("the concept has no evaluation sets")
    for s in sets:
        if not s.prompts:
            raise EvalError(f"evaluation set {s.name!r} has no prompts")
    return sets


def _draw(pipeline: Pipeline, params: Mapping[str, Any], prompts: Sequence[str], key: jax.Array,
          cfg: SamplingConfig, batch: int, mesh: jax.sharding.Mesh, bar: tqdm) -> np.ndarray:
    # One draw call per batch (image i depends only on key and i, so splitting changes
    # nothing) lets a single bar count every image of every set and model.
    out = []
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo : lo + batch]
        out.append(draw(pipeline, params, chunk, key, cfg, start_index=lo, batch_size=batch, mesh=mesh))
        bar.update(len(chunk))
    return np.concatenate(out)


def _pair(base: float, ablated: float | None) -> dict[str, float | None]:
    return {"base": float(base), "ablated": None if ablated is None else float(ablated)}


def _check_settings(config: ml_collections.ConfigDict, base_only: bool) -> int:
    """The number of images per set, once the settings evaluation alone reads are checked."""
    e = config.eval
    n = int(e.num_images)
    if n < (1 if base_only else 2):
        raise EvalError(f"eval.num_images must be at least {1 if base_only else 2} (KID compares sets), got {n}")
    if e.grid_columns < 1:
        raise EvalError(f"eval.grid_columns must be positive, got {e.grid_columns}")
    return n


def _measure_set(s: concepts.EvalSet, emb: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray],
                 concept: concepts.Concept, config: ml_collections.ConfigDict, n: int) -> dict[str, Any]:
    """One set's report entry: CLIP score and accuracy per model, anchor rate for target sets, paired KID."""
    e = config.eval
    versus = concept.targets[0] if s.role == "anchor" else concept.anchor
    entry: dict[str, Any] = {"role": s.role, "concept": s.concept, "n_images": n}
    score = {m: float(np.mean(clip_scores(v, text[s.concept][None]))) for m, v in emb.items()}
    acc = {m: clip_accuracy(v, text[s.concept], text[versus]) for m, v in emb.items()}
    entry["clip_score"] = _pair(score["base"], score.get("ablated"))
    entry["clip_accuracy"] = _pair(acc["base"], acc.get("ablated"))
    if s.role in ("target", "target_paraphrase"):
        # Strictly "anchor beats target": 1 - accuracy except where both scores clip to 0.
        rate = {m: clip_accuracy(v, text[concept.anchor], text[s.concept]) for m, v in emb.items()}
        entry["anchor_rate"] = _pair(rate["base"], rate.get("ablated"))
    entry["kid"] = (kid(emb["ablated"], emb["base"], subsets=int(e.kid_subsets), subset_size=int(e.kid_subset_size),
                        seed=config.seed, paired=True) if "ablated" in emb else None)
    return entry


def _memorization_entry(method: str, threshold: float, sets: list[str],
                        similarity: Mapping[str, list[np.ndarray]]) -> dict[str, Any]:
    if not sets:
        raise EvalError("a memorization concept needs an evaluation set with role 'target'")
    sim = {m: np.concatenate(v) for m, v in similarity.items()}
    rate = {m: float(np.mean(v > threshold)) for m, v in sim.items()}
    return {
        "method": method, "threshold": float(threshold), "sets": sets, "n_images": int(len(sim["base"])),
        "rate": _pair(rate["base"], rate.get("ablated")),
        "similarity": _pair(float(np.mean(sim["base"])), float(np.mean(sim["ablated"])) if "ablated" in sim else None),
    }


def _attack_entries(spec: Spec, kinds: Sequence[str], pipeline: Pipeline, models: Mapping[str, Any],
                    mesh: jax.sharding.Mesh, clip: CLIP, success: Any, n: int, batch: int, stage: Any,
                    progress: bool, prefix: str = "") -> dict[str, Any]:
    """Runs the attacks against every model, draws ``n`` images of each with held-out seeds and scores them."""
    config = spec.config
    t0 = time.perf_counter()
    built = attacks.build(spec, kinds, pipeline, models, mesh)
    cfg = eval_sampling(config)
    variants = [name for name, per_model in built.items() if next(iter(per_model.values())).kind == "misspelling"]
    draws = len(built) + (1 if variants else 0)
    bar = tqdm(total=draws * len(models) * n, desc="attacks", unit="img", disable=not progress)
    out: dict[str, Any] = {}
    rates: dict[str, dict[str, float]] = {}

    def measure(name: str, per_model: Mapping[str, attacks.Attack]) -> None:
        key = set_key(config.seed, f"attack/{name}")
        images, emb, prompts = {}, {}, {}
        for m, attack in per_model.items():
            prompts[m] = [attack.prompts[j % len(attack.prompts)] for j in range(n)]
            params = attack.params if attack.params is not None else models[m]
            images[m] = _draw(pipeline, params, prompts[m], key, cfg, batch, mesh, bar)
            emb[m] = image_embeddings(clip, images[m])
        rates[name] = rate = {m: success(images[m], emb[m], emb["base"]) for m in per_model}
        first = next(iter(per_model.values()))
        out[prefix + name] = {"kind": first.kind, "n_images": n,
                              "success_rate": _pair(rate["base"], rate.get("ablated")),
                              "detail": {m: a.detail for m, a in per_model.items()},
                              "prompt": prompts.get("ablated", prompts["base"])[0]}
        if stage is not None:
            # A search finds its own prompt against each model: then a row names both.
            captions = [pb if pb == pa else f"base: {pb} | ablated: {pa}"
                        for pb, pa in zip(prompts["base"], prompts.get("ablated", prompts["base"]), strict=True)]
            grid = before_after_grid(images["base"], images.get("ablated"), captions, int(config.eval.grid_columns))
            grid.save(stage / grid_filename(f"attack_{prefix}{name}"))

    try:
        for name, per_model in built.items():
            measure(name, per_model)
        if variants:
            # The attacker's pick among the misspellings, drawn again on seeds of its own: the largest of
            # several rates measured on the same images overstates the best variant's.
            picks = {m: attacks.best_misspelling([(built[v][m], rates[v][m]) for v in variants]) for m in models}
            measure(attacks.BEST_MISSPELLING, picks)
    finally:
        bar.close()
    log.info("attacks: %d run and scored in %.1f s", len(out), time.perf_counter() - t0)
    return out


def evaluate_run(
    spec: Spec | ml_collections.ConfigDict,
    workdir: str | os.PathLike | Workdir,
    *,
    ablated_params: Mapping[str, Any] | None = None,
    base_only: bool = False,
    pipeline: Pipeline | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    extra_sets: Sequence[concepts.EvalSet] = (),
    clip: CLIP | None = None,
    attack_kinds: Sequence[str] | None = None,
    base_images: dict[Any, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Evaluates base against ablated parameters on every evaluation set; writes ``workdir/eval/``.

    ``spec``: the run (a config is prepared first). ``ablated_params``: a full params dict like
    ``pipeline.params`` (``unet``, ``vae``, ``text_encoder``); required unless ``base_only``.
    ``pipeline`` and ``clip`` default to the spec's model and evaluator. The concept's sets include
    the misspellings of its target when ``eval.misspelling``; ``extra_sets`` are evaluated after
    them (``eval.sets`` does not filter them). ``attack_kinds`` (default: ``eval.attacks``) are then
    run against every model and scored (:mod:`ablate_jax.attacks`). ``base_images``: a dict the base
    model's images are kept in and taken from, shared by evaluations of one pipeline (a sweep's runs
    draw each set's base images once). A run of several concepts evaluates each concept's sets (and
    attacks) in turn, against that concept's own anchor and neighbours, into one report whose set
    and attack names are ``LABEL.NAME``. Returns the report (schema in :mod:`ablate_jax.report`);
    the files appear only once everything is measured, so a failed evaluation leaves the previous ones.
    """
    start = time.perf_counter()
    spec = prepare(spec)
    config = spec.config
    if not base_only and ablated_params is None:
        raise EvalError("no ablated parameters to evaluate; pass ablated_params or base_only=True")
    if extra_sets and spec.several:
        raise EvalError("extra_sets belong to one concept; evaluate a run of several concepts by its own sets")
    n = _check_settings(config, base_only)
    e = config.eval
    wanted_names = [x.strip() for x in e.sets.split(";") if x.strip()]
    chosen = [(label, part, _select_sets(part.concept, _names_of(wanted_names, label), extra_sets,
                                         allow_none=bool(label and wanted_names)))
              for label, part in spec.each()]
    chosen = [(label, part, sets) for label, part, sets in chosen if sets]
    cfg = eval_sampling(config)
    if pipeline is None:
        pipeline = load_pipeline(spec.model_path, dtype=jnp.bfloat16 if config.dtype == "bfloat16" else None)
    clip = clip or load_clip(spec.evaluator_path)
    mesh = mesh or sharding.make_mesh()
    n_dev = mesh.devices.size
    # One compiled batch shape for every call, no larger than a set needs.
    batch = min(sharding.round_up(int(e.batch_size), n_dev), sharding.round_up(n, n_dev))
    kinds = attack_kinds_of(config.eval.attacks) if attack_kinds is None else tuple(attack_kinds)
    models = {"base": pipeline.params} if base_only else {"base": pipeline.params, "ablated": ablated_params}

    write = jax.process_index() == 0  # every process computes; one writes
    eval_dir = storage.path(workdir) / "eval"
    # Grids are drawn into a local staging folder and moved into eval/ once the report is whole.
    cleanup = contextlib.ExitStack()
    stage = cleanup.enter_context(storage.staging(storage.path(workdir), ".eval-")) if write else None
    total_sets = sum(len(sets) for _, _, sets in chosen)
    gen_bar = tqdm(total=total_sets * len(models) * n, desc="generating", unit="img", disable=not progress or not write)
    score_bar = tqdm(total=total_sets, desc="scoring", unit="set", disable=not progress or not write)
    run = _ConceptEval(pipeline=pipeline, clip=clip, mesh=mesh, models=models, cfg=cfg, batch=batch, n=n,
                       stage=stage, gen_bar=gen_bar, score_bar=score_bar, base_images=base_images,
                       progress=progress and write)
    try:
        report_sets: dict[str, Any] = {}
        memorized: dict[str, Any] = {}
        attacked: dict[str, Any] = {}
        for label, part, sets in chosen:
            got = run.concept(part, sets, label, kinds)
            report_sets.update(got["sets"])
            if "memorization" in got:
                memorized[label] = got["memorization"]
            attacked.update(got.get("attacks", {}))
        gen_bar.close()
        score_bar.close()

        report: dict[str, Any] = {}
        if spec.several:
            report["concepts"] = [{"label": label, **_concept_entry(part)} for label, part in spec.each()]
        else:
            report["concept"] = _concept_entry(spec)
        report["settings"] = {"model": str(config.model), "clip": str(e.clip), "seed": int(config.seed),
                              "num_images": n, "sampler": cfg.sampler, "steps": cfg.num_steps,
                              "guidance": float(cfg.guidance_scale), "eta": float(cfg.eta),
                              "base_only": bool(base_only)}
        report["sets"] = report_sets
        if memorized:
            report["memorization"] = memorized if spec.several else memorized[""]
        if kinds:
            report["attacks"] = attacked
        report["timing_s"] = {"eval": time.perf_counter() - start}
        check_report(report)
        if stage is not None:
            eval_dir.mkdir(parents=True, exist_ok=True)
            for f in sorted(stage.iterdir()):
                storage.move(f, eval_dir / f.name)
            write_report(report, eval_dir)
        return report
    finally:
        gen_bar.close()
        score_bar.close()
        cleanup.close()


def _names_of(names: Sequence[str], label: str) -> str:
    """The ``eval.sets`` names that belong to one concept of a run of several (``LABEL.SET`` -> ``SET``)."""
    if not label:
        return ";".join(names)
    return ";".join(x[len(label) + 1 :] for x in names if x.startswith(label + "."))


def _concept_entry(spec: Spec) -> dict[str, Any]:
    c = spec.concept
    return {"kind": c.kind, "targets": list(c.targets), "anchor": c.anchor, "preserve": list(c.preserve),
            "preset": spec.config.concept.preset}


@dataclasses.dataclass
class _ConceptEval:
    """What the concepts of one evaluation share: the models, the evaluator, the sampling and the bars."""

    pipeline: Pipeline
    clip: CLIP
    mesh: jax.sharding.Mesh
    models: Mapping[str, Any]
    cfg: SamplingConfig
    batch: int
    n: int
    stage: Any
    gen_bar: Any
    score_bar: Any
    base_images: dict[Any, np.ndarray] | None
    progress: bool

    def concept(self, spec: Spec, sets: Sequence[concepts.EvalSet], label: str,
                kinds: Sequence[str]) -> dict[str, Any]:
        """One concept's sets (and attacks) measured: ``{"sets", "memorization"?, "attacks"?}``, names
        prefixed ``LABEL.`` for a concept among several. A set's images are keyed by its own name, so
        they are the images the same concept removed alone is measured on."""
        config, concept = spec.config, spec.concept
        models, n = self.models, self.n
        prefix = f"{label}." if label else ""
        phrase = spec.evaluator_family.evaluator_phrase
        target_concept = next((s.concept for s in concept.eval_sets if s.role == "target"), concept.targets[0])
        # What an attack's image may be read as: the target, the anchor or one of the concept's neighbours.
        readings = list(dict.fromkeys([target_concept, concept.anchor, *(
            s.concept for s in concept.eval_sets if s.role in ("preserved", "surrounding"))]))
        wanted = list(dict.fromkeys([concept.anchor, concept.targets[0], *readings, *(s.concept for s in sets)]))
        text = dict(zip(wanted, text_embeddings(self.clip, [concept_text(phrase(c)) for c in wanted]), strict=True))
        memorizing = concept.kind == "memorization"
        if memorizing:
            mem_method, mem_threshold, similarity = memorization.eval_detector(spec, self.clip)
            mem_sim: dict[str, list[np.ndarray]] = {m: [] for m in models}
            mem_sets: list[str] = []
        report_sets: dict[str, Any] = {}
        for s in sets:
            prompts = set_prompts(s, n)
            key = set_key(config.seed, s.name)
            images, emb = {}, {}
            for m, params in models.items():
                self.gen_bar.set_postfix_str(f"{prefix}{s.name}, {m}")
                # The base model's images depend only on these; runs of a sweep that share them draw them once.
                shared = (s.name, tuple(prompts), int(config.seed), self.cfg, self.batch) if m == "base" else None
                if self.base_images is not None and shared in self.base_images:
                    images[m] = self.base_images[shared]
                    self.gen_bar.update(len(prompts))
                    continue
                images[m] = _draw(self.pipeline, params, prompts, key, self.cfg, self.batch, self.mesh, self.gen_bar)
                if self.base_images is not None and shared is not None:
                    self.base_images[shared] = images[m]
            for m in models:
                emb[m] = image_embeddings(self.clip, images[m])
            entry = _measure_set(s, emb, text, concept, config, n)
            report_sets[prefix + s.name] = {**entry, "group": label} if label else entry
            if memorizing and s.role == "target":
                mem_sets.append(prefix + s.name)
                for m in models:
                    mem_sim[m].append(np.asarray(similarity(images[m], emb[m], emb["base"]), np.float64))
            if self.stage is not None:
                grid = before_after_grid(images["base"], images.get("ablated"), prompts, int(config.eval.grid_columns))
                grid.save(self.stage / grid_filename(prefix + s.name))
            self.score_bar.update(1)
        out: dict[str, Any] = {"sets": report_sets}
        if memorizing:
            out["memorization"] = _memorization_entry(mem_method, mem_threshold, mem_sets, mem_sim)
        if kinds:
            classes = np.stack([text[c] for c in readings])

            def success(images: np.ndarray, emb: np.ndarray, base_emb: np.ndarray) -> float:
                # Memorized images are recognised by the memorization measure; a concept by the evaluator
                # reading the image as the target rather than the anchor or any neighbour of the concept
                # (a face that is a preserved frowny does not count as a smiley).
                if memorizing:
                    return float(np.mean(np.asarray(similarity(images, emb, base_emb)) > mem_threshold))
                return float(np.mean(zero_shot(emb, classes) == 0))

            found = _attack_entries(spec, kinds, self.pipeline, models, self.mesh, self.clip, success, n, self.batch,
                                    self.stage, self.progress, prefix)
            out["attacks"] = {name: {**a, "group": label} if label else a for name, a in found.items()}
        return out


# ------------------------------------------------------------------------------------------------ command line


def _parse(argv: list[str]) -> tuple[ml_collections.ConfigDict, str, bool, bool]:
    from absl import flags  # noqa: PLC0415

    fv = cli.flag_values(argv, "the run's folder; results go to WORKDIR/eval/")
    flags.DEFINE_bool("base_only", False, "evaluate the pretrained model alone (needs no checkpoint)", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show progress bars", flag_values=fv)
    flags.DEFINE_bool("attacks", False, "also run the attacks: those eval.attacks names, or every one",
                      flag_values=fv)
    config, workdir = cli.parse(fv, argv, EvalError)
    if fv.attacks and not config.eval.attacks:
        config_lib.override(config, "eval.attacks", "all")
    return config, workdir, fv.base_only, fv.progress


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ablate_jax.evaluate --config=... --workdir=... [--base_only] [--attacks]``; returns the exit status."""
    from ablate_jax import checkpointing, preflight  # noqa: PLC0415

    try:
        config, path, base_only, progress = _parse(list(sys.argv if argv is None else argv))
        spec = prepare(config)
        workdir = preflight.check_run(spec, path, stages=("eval",))
        pipeline = ablated = None
        if not base_only:
            pipeline = load_pipeline(spec.model_path, dtype=jnp.dtype(spec.config.dtype))
            ablated = checkpointing.restore_ablated_params(workdir, pipeline)
        report = evaluate_run(spec, workdir, ablated_params=ablated, base_only=base_only, pipeline=pipeline,
                              progress=progress)
    except (ValueError, OSError, checkpointing.CheckpointError) as err:
        print(f"error: {cli.one_line(err)}", file=sys.stderr)
        return 1
    print(format_table(report))
    print(f"wrote {storage.path(workdir) / 'eval'}: report.json, report.md and a grid per set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
