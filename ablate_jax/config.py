"""The run configuration shared by every phase (generate, train, evaluate, export).

Config files in ``configs/`` call :func:`base_config`, set what their method changes, then
:func:`finalize` applies the ``:arg`` string (``concept=grumpy_cat,model=/data/sd-v1-4``) and
locks the dict, so a misspelled key fails instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections

from ablate_jax import concepts, losses
from ablate_jax.sampling import SamplingConfig
from ablate_jax.toy import is_toy_world


class ConfigError(ValueError):
    """A config value that cannot be used; the message says which and why."""


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with the toy world's instance concept as the default."""
    c = ml_collections.ConfigDict()
    c.model = "toy"  # "toy", a diffusers folder, a hub id or a gs:// path
    c.seed = 0
    c.dtype = "float32"  # compute dtype of the models: float32 | bfloat16

    # The concept: a preset fills every field; any field set here overrides the preset's.
    c.concept = ml_collections.ConfigDict()
    c.concept.preset = "toy_smiley"
    c.concept.kind = ""  # instance | style | memorization
    c.concept.target = ""  # several targets separated by ';'
    c.concept.anchor = ""
    c.concept.anchor_prompts = ""  # prompt file, or a built-in set name such as anchor_cat

    c.params = "xattn_kv"  # xattn_kv | xattn | attn | full | embedding
    c.loss = "model_based"  # model_based | noise_based
    c.teacher = "frozen"  # frozen | online
    c.prior_weight = 0.0
    # Surrounding concepts kept by the preservation term; empty means the preset's list. On the
    # command line: preserve.concepts=frowny;winky.
    c.preserve = ml_collections.ConfigDict()
    c.preserve.concepts = ()
    c.preserve.weight = 0.0
    c.stop_sot_kv_grad = True

    # Device layout. fsdp > 1 splits parameters and optimizer state over that many devices
    # (fully sharded data parallel) for full fine-tunes of models too large to replicate; the
    # batch is always split over every device. Results equal plain data parallelism.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1

    c.anchors = ml_collections.ConfigDict()
    c.anchors.num_images = 200
    c.anchors.sampler = "dpmpp_2m"
    c.anchors.steps = 25
    c.anchors.guidance = 6.0
    c.anchors.eta = 0.0
    # Images per device in one sampling call. Per device, not global: XLA's CPU kernels give
    # bit-identical images across device counts only at the same per-device batch.
    c.anchors.batch_size = 8
    c.anchors.shard_size = 64  # images per dataset shard (the unit of resumption)
    # Memorization concepts on real models: an anchor image is dropped when its CLIP (eval.clip)
    # image-embedding cosine to any of `memorization_references` images the base model draws
    # from the memorized caption exceeds this. The toy model uses its world's calibrated measure.
    c.anchors.memorization_threshold = 0.9
    c.anchors.memorization_references = 4

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.learning_rate = 1.6e-5
    c.train.weight_decay = 1e-2
    c.train.clip_norm = 1.0
    c.train.flip = True
    c.train.rescale = True  # shrink/zoom augmentation with prompt prefixes (DESIGN.md 1.4)
    c.train.checkpoint_every = 50
    c.train.log_every = 10
    # Metrics also go to TensorBoard event files in WORKDIR/logs (written through TensorFlow's
    # file systems, gs:// included); False keeps them in the log only.
    c.train.tensorboard = True

    c.eval = ml_collections.ConfigDict()
    c.eval.enabled = True
    c.eval.num_images = 20  # per evaluation set
    c.eval.sampler = "ddim"
    c.eval.steps = 50
    c.eval.eta = 1.0
    c.eval.guidance = 6.0
    c.eval.batch_size = 64
    c.eval.clip = "toy"  # "toy", a folder or a hub id such as openai/clip-vit-large-patch14
    c.eval.misspelling = True  # also evaluate a one-letter misspelling of the target
    c.eval.sets = ""  # ';'-separated set names to evaluate; empty: all of the concept's sets
    c.eval.kid_subsets = 100  # KID: random subsets averaged (clean-fid's default)
    c.eval.kid_subset_size = 1000  # KID: rows per subset, capped at the set's size
    # Memorization on real models: CLIP image cosine above which a sample counts as a copy, and an
    # optional image file of the memorized picture (empty: compare with the base model's own
    # samples of the memorized caption). The toy world uses its own copy detector and threshold.
    c.eval.memorization_threshold = 0.9
    c.eval.memorized_image = ""
    c.eval.grid_columns = 4  # images per side in each row of the before/after grids

    c.export = ml_collections.ConfigDict()
    c.export.enabled = True
    c.export.overwrite = False  # replace an existing export of another run (else: refused)
    return c


def _parse_arg(arg: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (arg or "").split(",")):
        if "=" not in part:
            raise ConfigError(f"config argument {part!r} must look like key=value")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _set(config: ml_collections.ConfigDict, dotted: str, value: str) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {dotted!r}")
        node = node[p]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"unknown config key {dotted!r}")
    old = node[leaf]
    try:
        if isinstance(old, tuple):
            new: Any = concepts.parse_targets(value)  # the same ";" lists as concept.target
        elif isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            new = value.lower() in ("true", "1")
        else:
            new = type(old)(value)
    except ValueError as e:
        raise ConfigError(f"config key {dotted!r} needs a {type(old).__name__}, got {value!r}") from e
    node[leaf] = new


# Learning rate and steps per parameter group (global batch 8). Real Stable Diffusion: the
# paper's reference values (2e-6 per example for cross-attention, 2e-6 for full fine-tuning);
# the embedding value is a starting point, not a tuned figure. The toy world's were tuned on the
# previous toy model and hold on the current one for xattn_kv (README, "Results"): its tiny UNet
# needs larger steps than SD's.
SD_SCHEDULE = {"xattn_kv": (1.6e-5, 200), "xattn": (1.6e-5, 200), "attn": (1.6e-5, 200), "full": (2e-6, 400),
               "embedding": (1e-3, 200)}
# Full fine-tuning for the memorized image stops at 50 steps: by then its caption draws an orange
# star in every sample, and further steps only wear down the orange stars themselves (0.95 -> 0.85
# at 100 steps of 1e-4, 0.70 at 300 steps of 3e-5; README, "Results").
TOY_SCHEDULE = {"xattn_kv": (3e-4, 600), "xattn": (3e-4, 300), "attn": (3e-4, 300), "full": (1e-4, 50),
                "embedding": (1e-2, 300)}
# Preservation weight per loss. The noise-based loss pulls towards the anchor images with a
# noisier, weaker gradient than the teacher's prediction; at weight 4 the preserved faces held the
# smiley's shared features back (smiley 1.00 -> 0.20 at 600 steps), at 1 it goes (-> 0.05).
TOY_PRESERVE_WEIGHT = {"model_based": 4.0, "noise_based": 1.0}


def model_defaults(config: ml_collections.ConfigDict, model: str) -> None:
    """Sets learning rate, steps, anchor count and preservation for the toy world or a real model."""
    toy = is_toy_world(model)
    lr, steps = (TOY_SCHEDULE if toy else SD_SCHEDULE).get(config.params, (config.train.learning_rate,
                                                                           config.train.steps))
    config.train.learning_rate, config.train.steps = lr, steps
    config.anchors.num_images = 200 if toy else 1000
    # The toy model's face instances are close neighbours: without the preservation term, a
    # rate that removes the smiley removes the frowny too (README, "Results").
    # (The embedding group cannot move other concepts' prompts, and full fine-tuning for a memorized
    # image keeps its neighbours through the prior term instead.)
    if config.loss not in losses.LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(losses.LOSSES)}, got {config.loss!r}")
    keeps = toy and config.params in ("xattn_kv", "xattn", "attn")
    config.preserve.weight = TOY_PRESERVE_WEIGHT[config.loss] if keeps else 0.0


def finalize(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies ``arg`` and locks the config.

    ``arg`` is ``key=value`` pairs separated by commas: ``concept=NAME`` picks a preset, ``model=PATH``
    picks the model and with it the defaults of :func:`model_defaults`, ``loss=`` picks the loss
    (and with it the toy world's preservation weight), and any other key sets that field (after
    the defaults, so it wins).
    """
    values = _parse_arg(arg)
    for selector in ("model", "loss"):
        if selector in values:
            _set(config, selector, values.pop(selector))
    model_defaults(config, config.model)
    for key, value in values.items():
        _set(config, "concept.preset" if key == "concept" else key, value)
    config.lock()
    return config


def concept_from_config(config: ml_collections.ConfigDict) -> concepts.Concept:
    """The :class:`~ablate_jax.concepts.Concept` a config describes: its preset, then its overrides."""
    c = config.concept
    if c.preset:
        base = concepts.preset(c.preset)
        fields = dict(kind=base.kind, targets=base.targets, anchor=base.anchor, anchor_prompts=base.anchor_prompts,
                      preserve=base.preserve, eval_sets=base.eval_sets, style_templates=base.style_templates)
    else:
        fields = dict(kind="", targets=(), anchor="", anchor_prompts=(), preserve=(), eval_sets=())
    changed = False
    if c.kind:
        fields["kind"], changed = c.kind, changed or c.kind != fields["kind"]
    if c.target:
        targets = concepts.parse_targets(c.target)
        fields["targets"], changed = targets, changed or targets != fields["targets"]
    if c.anchor:
        fields["anchor"], changed = c.anchor, changed or c.anchor != fields["anchor"]
    if c.anchor_prompts:
        fields["anchor_prompts"], changed = concepts.prompts_from(c.anchor_prompts), True
    if config.preserve.concepts:
        fields["preserve"] = tuple(k.strip() for k in config.preserve.concepts if k.strip())
    if not fields["kind"]:
        raise ConfigError("set concept.preset or concept.kind (instance, style or memorization)")
    if not fields["targets"]:
        raise ConfigError("set concept.preset or concept.target")
    if not fields["anchor_prompts"]:
        raise ConfigError("set concept.preset or concept.anchor_prompts")
    if changed or not fields["eval_sets"]:
        # The preset's evaluation sets describe its own target; rebuild them for the new one.
        fields["eval_sets"] = default_eval_sets(fields)
    elif config.preserve.concepts:
        fields["eval_sets"] = _relabel(fields["eval_sets"], fields["preserve"])
    return concepts.Concept(**fields)


def _relabel(sets: tuple[concepts.EvalSet, ...], preserve: tuple[str, ...]) -> tuple[concepts.EvalSet, ...]:
    """Marks a neighbour's set ``preserved`` when training keeps it and ``surrounding`` (held out) when not,
    so a figure the preservation term was trained on is never read as generalization. A set matches by its
    concept ("frowny") or its name: a style's set is named "dotted" and judged as "dotted background"."""
    out = []
    for s in sets:
        if s.role in ("preserved", "surrounding"):
            kept = s.concept in preserve or s.name in preserve
            s = dataclasses.replace(s, role="preserved" if kept else "surrounding")
        out.append(s)
    return tuple(out)


def default_eval_sets(fields: dict[str, Any]) -> tuple[concepts.EvalSet, ...]:
    """Target and anchor sets built from the anchor prompts, for a user-defined concept."""
    probe = concepts.Concept(**{**fields, "eval_sets": ()})
    prompts = probe.usable_anchor_prompts()[:20]
    target = probe.targets[0]
    target_prompts = tuple(probe.target_prompt(p, i * len(probe.targets)) for i, p in enumerate(prompts))
    sets = [concepts.EvalSet("target", "target", target, target_prompts),
            concepts.EvalSet("anchor", "anchor", probe.anchor, prompts)]
    sets += [concepts.EvalSet(k.replace(" ", "_"), "preserved", k,
                              tuple(probe.keep_prompt(p, k, i) for i, p in enumerate(prompts)))
             for k in probe.preserve]
    return tuple(sets)


def anchor_sampling(config: ml_collections.ConfigDict) -> SamplingConfig:
    a = config.anchors
    return SamplingConfig(sampler=a.sampler, num_steps=a.steps, guidance_scale=a.guidance, eta=a.eta)


def eval_sampling(config: ml_collections.ConfigDict) -> SamplingConfig:
    e = config.eval
    return SamplingConfig(sampler=e.sampler, num_steps=e.steps, guidance_scale=e.guidance, eta=e.eta)


def fingerprint(config: ml_collections.ConfigDict, *keys: str) -> dict[str, Any]:
    """The config fields a workdir artefact depends on, plus a short hash of them.

    Stored beside anchors and checkpoints; a rerun whose fingerprint differs is refused rather
    than mixing two runs in one workdir.
    """
    flat = config.to_dict()
    picked: dict[str, Any] = {}
    for key in keys:
        node: Any = flat
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    digest = hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"fields": picked, "hash": digest}


ANCHOR_KEYS = ("model", "seed", "concept", "anchors.num_images", "anchors.sampler", "anchors.steps",
               "anchors.guidance", "anchors.eta", "anchors.shard_size")
