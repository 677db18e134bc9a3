"""The run configuration shared by every stage (anchors, train, evaluate, export).

A config file in ``configs/`` calls :func:`base_config`, sets what its method changes, and
:func:`finalize` applies the ``:arg`` string (``concept=grumpy_cat,model=/data/sd-v1-4``) and
locks the dict, so a misspelled key fails instead of being silently ignored. ``--config.KEY=VALUE``
flags go through the same setter (:func:`override`).

Values that depend on the model family, the parameter group, the loss or the concept (learning
rate, steps, anchor count, VAE encoder chunks, prior and preservation weights, rescale
augmentation, evaluator) are left unset in the file and filled by :func:`prepare`, in this one
place, once the family is read from the model and the concept is built; the resulting
:class:`Spec` is what every stage receives.
So ``configs/xattn.py:params=full,model=DIR``, ``configs/full.py:model=DIR`` and the same values
given as flags in any order all train the same thing, and a value set explicitly, by any route,
always wins over a resolved one (docs/design.md, "Configuration").
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from ablate_jax import concepts, families, losses
from ablate_jax.text_to_image import SamplingConfig

PARAM_GROUPS = ("xattn_kv", "xattn", "attn", "full", "embedding")
ATTACKS = ("misspelling", "paraphrase", "embedding", "search")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "attention", "blocks")


class ConfigError(ValueError):
    """A config value that cannot be used; the message says which and why."""


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with the toy world's instance concept as the default.

    Fields created with ``placeholder`` are resolved per model, parameter group and loss by
    :func:`resolve` unless set.
    """
    auto = config_dict.placeholder
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
    # Neighbours evaluated but never trained on (';'-separated), for a concept defined by its fields.
    # Empty: the model family's neighbours of the target (on the toy world, the other values of the
    # target's attribute that are not preserved).
    c.concept.held_out = ""
    # Several concepts removed from one model (docs/many-concepts.md): ';'-separated preset names, or in a
    # config file a tuple whose entries are preset names or concept_fields(...) strings. Set, it
    # replaces `concept` and `preserve.concepts`: each concept brings its own anchor, prompts,
    # preservation list and evaluation sets.
    c.concepts = ()

    c.params = "xattn_kv"  # xattn_kv | xattn | attn | full | embedding
    c.loss = "model_based"  # model_based | noise_based
    # The model the loss's anchor prediction comes from: "frozen" is the pretrained model, fixed for
    # the whole run; "online" is the model being trained, under stop-gradient (what the paper's
    # released trainers do). docs/results.md, "Frozen or online teacher".
    c.teacher = "frozen"
    c.prior_weight = auto(float)
    # Surrounding concepts kept by the preservation term; empty means the preset's list. On the
    # command line: preserve.concepts=frowny;winky.
    c.preserve = ml_collections.ConfigDict()
    c.preserve.concepts = ()
    c.preserve.weight = auto(float)
    c.stop_sot_kv_grad = True

    # Robust ablation (docs/attacks.md). ``adversarial``: each step, a few steps of gradient ascent
    # find the perturbation of the target words' embeddings (each within ``epsilon`` times its
    # norm) under which the student strays furthest from the anchor, and the ablation loss is
    # applied there too, weighted by ``weight``. ``misspell``: the fraction of target prompts whose
    # target word gets one random letter changed (never one of the attacks' own variants).
    c.robust = ml_collections.ConfigDict()
    c.robust.adversarial = False
    c.robust.epsilon = 1.0
    c.robust.steps = 3
    c.robust.weight = 1.0
    c.robust.misspell = 0.0
    # ``paraphrase``: the fraction of target prompts that name the target by one of the concept's
    # aliases instead ("a red happy face" for "a red smiley").
    c.robust.paraphrase = 0.0
    # ``context``: the fraction of examples whose prompts all begin with one to three random words of
    # the tokenizer's vocabulary (never a word naming the target), as a prompt search's prefix does.
    c.robust.context = 0.0

    # Device layout. fsdp > 1 splits parameters and optimizer state over that many devices
    # (fully sharded data parallel) for full fine-tunes of models too large to replicate; the
    # batch is always split over every device. Results equal plain data parallelism.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1

    c.anchors = ml_collections.ConfigDict()
    c.anchors.num_images = auto(int)
    c.anchors.sampler = "dpmpp_2m"
    c.anchors.steps = 25
    c.anchors.guidance = 6.0
    c.anchors.eta = 0.0
    # Images per device in one sampling call. Per device, not global: XLA's CPU kernels give
    # bit-identical images across device counts only at the same per-device batch.
    c.anchors.batch_size = 8
    c.anchors.shard_size = 64  # images per dataset shard (the unit of resumption)
    # A shared anchor store (a folder or gs:// URL): the set goes to STORE/<key>, the key a hash of
    # everything the images depend on, so every run, concept or sweep with the same anchors reuses
    # one set. Empty: WORKDIR/anchors, the run's own.
    c.anchors.store = ""
    # Memorization concepts on real models: an anchor image is dropped when its CLIP (eval.clip)
    # image-embedding cosine to any of `memorization_references` images the base model draws
    # from the memorized caption exceeds this. The toy model uses its world's calibrated measure.
    c.anchors.memorization_threshold = 0.9
    c.anchors.memorization_references = 4

    c.train = ml_collections.ConfigDict()
    c.train.steps = auto(int)
    # When train.steps is not given: the family's steps (as the augmentation and the concept count set them)
    # times this. A given train.steps is taken as it is.
    c.train.steps_factor = 1.0
    c.train.batch_size = 8
    c.train.learning_rate = auto(float)
    c.train.weight_decay = 1e-2
    c.train.clip_norm = 1.0
    c.train.flip = True
    c.train.rescale = auto(bool)  # shrink/zoom augmentation with prompt prefixes (docs/design.md, "Training data and augmentation")
    # The train step encodes its images through the VAE in this many sequential chunks (each a slice
    # of every device's rows; at most the rows a device holds): the same latents, less memory.
    c.train.encode_chunks = auto(int)
    c.train.checkpoint_every = 50
    c.train.log_every = 10
    # A checkpoint is written only if the objective on a fixed probe batch, measured with the
    # parameters being saved, is finite and at most this many times its value before training.
    c.train.divergence_factor = 100.0
    # Recompute activations in the backward pass instead of keeping them: "none", "attention"
    # (each transformer block) or "blocks" (each UNet down, mid and up block). Same numbers, less memory.
    c.train.remat = "none"
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
    c.eval.clip = auto(str)  # "toy", a folder or a hub id such as openai/clip-vit-large-patch14
    c.eval.misspelling = True  # also evaluate one-letter misspellings of the word naming the target
    c.eval.sets = ""  # ';'-separated set names to evaluate; empty: all of the concept's sets
    c.eval.kid_subsets = 100  # KID: random subsets averaged (clean-fid's default)
    c.eval.kid_subset_size = 1000  # KID: rows per subset, capped at the set's size
    # Memorization on real models: CLIP image cosine above which a sample counts as a copy, and an
    # optional image file of the memorized picture (empty: compare with the base model's own
    # samples of the memorized caption). The toy world uses its own copy detector and threshold.
    c.eval.memorization_threshold = 0.9
    c.eval.memorized_image = ""
    c.eval.grid_columns = 4  # images per side in each row of the before/after grids
    # Attacks that try to bring the target back, drawn and scored after the sets: ';'-separated
    # kinds (misspelling, paraphrase, embedding, search) or "all"; empty: none (docs/attacks.md).
    c.eval.attacks = ""

    # Settings of the learned attacks (embedding and search).
    c.attack = ml_collections.ConfigDict()
    c.attack.images = 16  # base-model images of target prompts that the learned attacks fit
    c.attack.embedding_steps = 300  # textual-inversion steps (Adam)
    c.attack.embedding_learning_rate = 5e-3
    c.attack.search_steps = 30  # rounds of the prompt search, one prefix position each
    c.attack.search_candidates = 16  # random vocabulary words tried per round
    c.attack.search_tokens = 3  # words put before the target prompt

    c.export = ml_collections.ConfigDict()
    c.export.enabled = True
    c.export.overwrite = False  # replace an existing export of another run (else: refused)
    return c


# ------------------------------------------------------------------------------------------------ setting values


def _parse_arg(arg: str | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for part in filter(None, (arg or "").split(",")):
        if "=" not in part:
            raise ConfigError(f"config argument {part!r} must look like key=value")
        key, value = part.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out


def _leaf(config: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {dotted!r}")
        node = node[p]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"unknown config key {dotted!r}")
    return node, leaf


def has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
    """Whether ``dotted`` names a value (not a section) of ``config``."""
    try:
        _leaf(config, dotted)
    except ConfigError:
        return False
    return True


def _parse_value(kind: type, value: str) -> Any:
    if kind is tuple:
        text = value.strip()
        if text[:1] in "([":  # a Python literal, as ml_collections' own flags take it
            parsed = ast.literal_eval(text)
            if not isinstance(parsed, (tuple, list)) or not all(isinstance(v, str) for v in parsed):
                raise ValueError(value)
            return tuple(v.strip() for v in parsed if v.strip())
        return concepts.parse_targets(value)  # the same ";" lists as concept.target
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(value)
        return value.lower() in ("true", "1")
    if kind is int:
        return int(value)
    if kind is float:
        return float(value)
    return kind(value)


def override(config: ml_collections.ConfigDict, dotted: str, value: str) -> None:
    """Sets ``dotted`` from its text, parsed as the field's type (the ``:arg`` string and flags both use it)."""
    node, leaf = _leaf(config, dotted)
    kind = node.get_type(leaf)
    try:
        new = _parse_value(kind, value)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"config key {dotted!r} needs {_type_name(kind)}, got {value!r}") from e
    node[leaf] = new


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            tuple: "a ';'-separated list"}.get(kind, f"a {kind.__name__}")


def finalize(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies ``arg`` and locks the config.

    ``arg`` is ``key=value`` pairs separated by commas: ``concept=NAME`` picks a preset and any
    other key sets that field. Nothing is resolved here: :func:`resolve` runs once the flags are
    applied too, so the order of the routes does not matter.
    """
    for key, value in _parse_arg(arg):
        override(config, "concept.preset" if key == "concept" else key, value)
    config.lock()
    return config


# ------------------------------------------------------------------------------------------------ resolution


RESOLVED_KEYS = ("train.learning_rate", "train.steps", "anchors.num_images", "prior_weight", "preserve.weight",
                 "train.rescale", "train.encode_chunks", "eval.clip")


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What :func:`prepare` filled in: per key, the value and the rule that gave it."""

    family: str
    values: dict[str, tuple[Any, str]]

    def lines(self) -> list[str]:
        return [f"{k}={v!r} ({why})" for k, (v, why) in self.values.items()]


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """A run as every stage sees it, built once by :func:`prepare` and handed from stage to stage.

    ``config`` is resolved and locked; ``family`` is the model family read from the model folder;
    ``concepts`` are built from the config for that family (docs/design.md, "Stages hand their results
    forward"). A run that removes several concepts also has ``parts``: one spec per concept, each an
    ordinary one-concept run of the same config, which the stages that work concept by concept
    (anchors, evaluation, attacks) take in turn; training reads the whole spec.
    """

    config: ml_collections.ConfigDict
    family: families.Family
    concepts: tuple[concepts.Concept, ...]
    notes: Resolution
    parts: tuple[Spec, ...] = ()
    labels: tuple[str, ...] = ()

    @property
    def concept(self) -> concepts.Concept:
        """The run's one concept; a run of several has none (its stages take :attr:`parts` in turn)."""
        if len(self.concepts) != 1:
            raise ConfigError(f"this stage takes one concept at a time, and the run removes {len(self.concepts)} "
                              f"({', '.join(self.labels)}); give it one of the run's parts")
        return self.concepts[0]

    @property
    def several(self) -> bool:
        """Whether the run removes several concepts (``concepts`` in the config)."""
        return bool(self.parts)

    def each(self) -> tuple[tuple[str, Spec], ...]:
        """``(label, spec)`` per concept: the parts of a run of several, else ``("", self)``."""
        if not self.parts:
            return (("", self),)
        return tuple(zip(self.labels, self.parts, strict=True))

    @property
    def model_path(self) -> str:
        """The folder (or hub id, or ``gs://`` URL) of ``config.model``; a named model becomes its folder."""
        return families.named_model(self.config.model, "pipeline") or self.config.model

    @property
    def evaluator_path(self) -> str:
        """The folder (or hub id) of ``config.eval.clip``."""
        return families.named_model(self.config.eval.clip, "clip") or self.config.eval.clip

    @functools.cached_property
    def evaluator_family(self) -> families.Family:
        """The family whose evaluator ``eval.clip`` is (how it is asked about a concept)."""
        return families.detect(self.config.eval.clip)


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node, leaf = _leaf(config, dotted)
    return node[leaf]


def _check_choices(config: ml_collections.ConfigDict) -> None:
    for key, allowed in (("params", PARAM_GROUPS), ("loss", losses.LOSSES), ("teacher", losses.TEACHERS)):
        if config[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {config[key]!r}")


def resolution(config: ml_collections.ConfigDict, family: families.Family,
               concept: concepts.Concept | tuple[concepts.Concept, ...]) -> Resolution:
    """The values :func:`prepare` fills in for ``family`` and the concept (or concepts), and why.

    With several concepts, each sees as many training examples as it would alone (the family's
    steps times their number); augmentation by rescaling is decided per concept by each part.
    """
    several = isinstance(concept, tuple) and len(concept) > 1
    group = concept if isinstance(concept, tuple) else (concept,)
    concept = group[0]
    _check_choices(config)
    where = family.title
    params, loss = config.params, config.loss
    values: dict[str, tuple[Any, str]] = {}

    def fill(key: str, value: Any, why: str) -> None:
        if _get(config, key) is None:
            values[key] = (value, why)

    lr, steps = family.schedule[params]
    fill("train.learning_rate", lr, f"{where}, {params}")
    # Misspelled or paraphrased target prompts take a share of the examples from the target itself: twice the steps
    # (on the toy world, attn at 300 steps with half of them misspelled left the smiley at 0.35).
    augmented = bool(config.robust.misspell or config.robust.paraphrase)
    twice = " x 2 with misspelled or paraphrased target prompts" if augmented else ""
    steps *= 2 if augmented else 1
    factor = config.train.steps_factor
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ConfigError(f"train.steps_factor must be a positive number, got {factor!r}")
    if factor != 1:
        steps = math.ceil(steps * factor)
        twice += f" x {factor:g} (train.steps_factor)"
    if several:
        fill("train.steps", steps * len(group), f"{where}, {params}{twice}, {steps} per concept x {len(group)} concepts")
    else:
        fill("train.steps", steps, f"{where}, {params}{twice}")
    fill("anchors.num_images", family.anchor_count, where)
    fill("train.encode_chunks", family.encode_chunks, where)
    fill("prior_weight", 1.0 if params == "full" else 0.0,
         "full fine-tuning keeps the anchor prompts' noise prediction" if params == "full" else f"{params}")
    if several:
        fill("train.rescale", any(c.kind != "memorization" for c in group),
             "decided per concept: off for memorized images, on for the others")
    else:
        fill("train.rescale", concept.kind != "memorization",
             "a memorized image is removed as drawn" if concept.kind == "memorization" else f"{concept.kind} concept")
    if _get(config, "preserve.weight") is None:
        weight, why = 0.0, f"{where}, {params}"
        own = family.preserve_weight(params, loss)
        if not any(c.preserve for c in group):
            why = "the concept names nothing to preserve"
        elif config.teacher != "frozen":
            why = "an online teacher cannot hold the neighbours (the term would be zero)"
        elif own is not None:
            weight, why = own, f"{where}, {params}, {loss}"
        values["preserve.weight"] = (weight, why)
    fill("eval.clip", family.evaluator, f"the evaluator for the {where}")
    return Resolution(family.name, values)


def is_resolved(config: ml_collections.ConfigDict) -> bool:
    return all(_get(config, k) is not None for k in RESOLVED_KEYS)


def prepare(config: ml_collections.ConfigDict | Spec) -> Spec:
    """The run's :class:`Spec`: the model family detected, the concept built and every unset value of
    :data:`RESOLVED_KEYS` filled, all checked. A spec comes back as it is; the input is never modified."""
    if isinstance(config, Spec):
        return config
    family = families.detect(config.model)
    if config.concepts:
        return _prepare_several(config, family)
    concept = concept_from_config(config, family)
    notes = resolution(config, family, concept) if not is_resolved(config) else Resolution(family.name, {})
    out = _filled(config, notes) if notes.values or not config.is_locked else config
    check(out, family, concept)
    return Spec(out, family, (concept,), notes)


# The fields of one entry of ``concepts``: those of ``config.concept``, its own preservation list, and
# the target's aliases (other words for it: ``Concept.aliases``).
_CONCEPT_KEYS = ("preset", "kind", "target", "anchor", "anchor_prompts", "held_out")
_ENTRY_FIELDS = frozenset(_CONCEPT_KEYS) | {"preserve", "aliases"}


def concept_fields(**fields: Any) -> str:
    """One entry of ``concepts`` given by its fields (those of ``config.concept``, plus ``preserve`` and
    ``aliases``: ``;``-separated lists or tuples), for a config file: ``c.concepts = ("toy_smiley",
    concept_fields(kind="instance", target="grumpy cat", anchor="cat", anchor_prompts="anchor_cat"))``."""
    unknown = sorted(set(fields) - _ENTRY_FIELDS)
    if unknown:
        raise ConfigError(f"concept_fields: unknown field {unknown[0]!r}; use {', '.join(sorted(_ENTRY_FIELDS))}")
    for key in ("preserve", "aliases"):
        if isinstance(fields.get(key), (tuple, list)):
            fields[key] = ";".join(fields[key])
    return json.dumps(fields, sort_keys=True)


def _entry_fields(entry: str) -> dict[str, str]:
    """A ``concepts`` entry as ``config.concept`` fields (plus ``preserve``): a preset name, or a JSON object."""
    entry = entry.strip()
    if not entry.startswith("{"):
        return {"preset": entry}
    try:
        fields = json.loads(entry)
    except ValueError as e:
        raise ConfigError(f"concepts: the entry {entry!r} is neither a preset name nor a JSON object of fields") from e
    unknown = sorted(set(fields) - _ENTRY_FIELDS) if isinstance(fields, dict) else ["?"]
    if unknown:
        raise ConfigError(f"concepts: the entry {entry!r} has the unknown field {unknown[0]!r}; "
                          f"use {', '.join(sorted(_ENTRY_FIELDS))}")
    return {k: str(v) for k, v in fields.items()}


def _part_config(config: ml_collections.ConfigDict, fields: dict[str, str]) -> ml_collections.ConfigDict:
    """The one-concept run of ``config`` for one ``concepts`` entry's fields (unresolved, unlocked)."""
    part = ml_collections.ConfigDict(config.to_dict(), type_safe=True)
    part.concepts = ()
    for key in _CONCEPT_KEYS:
        part.concept[key] = fields.get(key, "")
    part.preserve.concepts = concepts.parse_targets(fields.get("preserve", ""))
    # A part is never trained (the whole run is): its concept may have nothing to preserve, and its
    # aliases (which an entry may give) are only set after it is prepared, so the run as a whole is
    # what the paraphrase augmentation is checked against.
    part.preserve.weight = 0.0
    part.robust.paraphrase = 0.0
    return part


def label(concept: concepts.Concept, preset: str) -> str:
    """A short name of a concept among several: its target set's name ("smiley"), else its first target."""
    target = next((s.name for s in concept.eval_sets if s.role == "target"), "")
    text = target or preset or concept.targets[0]
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in text.replace(" ", "_"))


def _prepare_several(config: ml_collections.ConfigDict, family: families.Family) -> Spec:
    """The spec of a run that removes every concept of ``config.concepts``.

    Each concept becomes a part: the config with that concept alone, resolved on its own (its anchor
    count, rescaling, evaluator; its anchors are those of the same concept removed alone). Across
    the parts a target is never preserved: another concept's target leaves a part's preservation
    list and its evaluation sets (it is measured as that concept's target). The whole config is
    resolved for all of them together, and it is what training reads.
    """
    entries = tuple(e for e in config.concepts if e.strip())
    if len(entries) < 2:
        raise ConfigError(f"concepts names {len(entries)} concept(s); give two or more (one concept: concept=NAME)")
    if tuple(config.preserve.concepts):
        raise ConfigError("preserve.concepts applies to one concept; with several, give each its own list "
                          "(its preset's, or a preserve field in concept_fields)")
    fields = [_entry_fields(e) for e in entries]
    specs = [prepare(_part_config(config, f)) for f in fields]
    for i, f in enumerate(fields):
        if "aliases" in f:  # an entry's aliases replace its preset's
            aliased = dataclasses.replace(specs[i].concept, aliases=concepts.parse_targets(f["aliases"]))
            specs[i] = dataclasses.replace(specs[i], concepts=(aliased,))
    targets = {t.lower() for s in specs for t in s.concept.names}
    for s in specs:
        if s.concept.anchor.lower() in targets:
            raise ConfigError(f"concepts: the anchor {s.concept.anchor!r} of one concept is the target of another")
    parts, names = [], []
    for s, entry in zip(specs, fields, strict=True):
        c = s.concept
        others = {t.lower() for o in specs if o is not s for t in o.concept.names}
        keep = tuple(k for k in c.preserve if k.lower() not in others)
        sets = tuple(e for e in c.eval_sets if e.role not in ("preserved", "surrounding")
                     or (e.concept.lower() not in others and e.name.lower() not in others))
        c = dataclasses.replace(c, preserve=keep, eval_sets=sets)
        parts.append(Spec(s.config, s.family, (c,), s.notes))
        names.append(label(c, entry.get("preset", "")))
    for i, n in enumerate(names):
        if names.count(n) > 1:
            names[i] = f"{n}{i + 1}"
    group = tuple(p.concept for p in parts)
    notes = resolution(config, family, group) if not is_resolved(config) else Resolution(family.name, {})
    out = _filled(config, notes) if notes.values or not config.is_locked else config
    check(out, family, group)
    return Spec(out, family, group, notes, tuple(parts), tuple(names))


def resolve(config: ml_collections.ConfigDict | Spec) -> ml_collections.ConfigDict:
    """``config`` with every unset value of :data:`RESOLVED_KEYS` filled, checked and locked (see :func:`prepare`).

    Idempotent: a resolved config comes back as it is.
    """
    return prepare(config).config


def _filled(config: ml_collections.ConfigDict, notes: Resolution) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(config.to_dict(), type_safe=True)
    # Placeholders lose their declared type in to_dict(); set values through the original's types.
    for key in RESOLVED_KEYS:
        node, leaf = _leaf(out, key)
        value = notes.values[key][0] if key in notes.values else _get(config, key)
        node[leaf] = value
    out.lock()
    return out


def check(config: ml_collections.ConfigDict, family: families.Family,
          concept: concepts.Concept | tuple[concepts.Concept, ...]) -> None:
    """The checks that need no model weights and no files: values in range, and choices that fit together."""
    group = concept if isinstance(concept, tuple) else (concept,)
    t = config.train

    def positive(key: str, value: float, *, integer: bool = False) -> None:
        ok = isinstance(value, (int, float)) and math.isfinite(value) and value > 0
        if not ok:
            raise ConfigError(f"{key} must be a positive {'integer' if integer else 'number'}, got {value!r}")

    for key, integer in (("train.steps", True), ("train.batch_size", True), ("train.learning_rate", False),
                         ("train.encode_chunks", True),
                         ("train.checkpoint_every", True), ("train.log_every", True),
                         ("train.divergence_factor", False), ("anchors.num_images", True),
                         ("anchors.batch_size", True), ("anchors.shard_size", True), ("anchors.steps", True),
                         ("eval.steps", True), ("eval.batch_size", True), ("eval.grid_columns", True),
                         ("eval.kid_subsets", True), ("eval.kid_subset_size", True), ("mesh.fsdp", True),
                         ("anchors.memorization_references", True)):
        positive(key, _get(config, key), integer=integer)
    for key in ("train.weight_decay", "train.clip_norm", "prior_weight", "preserve.weight"):
        value = _get(config, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
    if t.divergence_factor <= 1:
        raise ConfigError(f"train.divergence_factor must be above 1, got {t.divergence_factor}")
    if not 0.0 < config.anchors.memorization_threshold <= 1.0:
        raise ConfigError(f"anchors.memorization_threshold must be in (0, 1], got "
                          f"{config.anchors.memorization_threshold}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if t.remat not in REMAT:
        raise ConfigError(f"train.remat must be one of {', '.join(REMAT)}, got {t.remat!r}")
    _check_choices(config)
    if config.eval.enabled and config.eval.num_images < 2:
        raise ConfigError(f"eval.num_images must be at least 2 (KID compares two sets of images), "
                          f"got {config.eval.num_images}")
    for name, sampling in (("anchors", anchor_sampling(config)), ("eval", eval_sampling(config))):
        try:
            sampling.validate()
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from e
    if not config.eval.clip:
        raise ConfigError("eval.clip is empty; give a CLIP folder or hub id")
    attack_kinds(config.eval.attacks)
    for key in ("attack.images", "attack.embedding_steps", "attack.search_steps", "attack.search_candidates",
                "attack.search_tokens"):
        positive(key, _get(config, key), integer=True)
    positive("attack.embedding_learning_rate", config.attack.embedding_learning_rate)
    r = config.robust
    if r.adversarial:
        positive("robust.epsilon", r.epsilon)
        positive("robust.steps", r.steps, integer=True)
        positive("robust.weight", r.weight)
    for key in ("misspell", "paraphrase", "context"):
        if not 0.0 <= r[key] <= 1.0:
            raise ConfigError(f"robust.{key} must lie in [0, 1], got {r[key]}")
    for key in ("misspell", "paraphrase"):
        if r[key] == 1.0:
            raise ConfigError(f"robust.{key}=1 leaves none of the target's own prompts to train on; use a share "
                              "below 1")
    bare = [c.target for c in group if not c.aliases]
    if r.paraphrase and bare:
        raise ConfigError(f"robust.paraphrase names the target by its aliases, and {bare[0]!r} has none; use a "
                          "preset that has them, a concepts entry with concept_fields(aliases=...), or "
                          "robust.paraphrase=0")
    owner = next((f for f in families.all_families() if f.named(config.eval.clip, "clip")), None)
    if owner is not None and owner is not family:
        raise ConfigError(f"eval.clip={config.eval.clip!r} would score {config.model} with the {owner.title}'s "
                          f"evaluator; set --config.eval.clip to a CLIP folder or hub id such as "
                          f"{families.REAL_EVALUATOR}")
    if config.preserve.weight > 0 and not any(c.preserve for c in group):
        raise ConfigError(f"preserve.weight={config.preserve.weight:g} but the concept names nothing to preserve; "
                          "set preserve.concepts (e.g. preserve.concepts=tabby cat;siamese cat) or preserve.weight=0")
    try:
        loss_config(config).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e


def attack_kinds(text: str) -> tuple[str, ...]:
    """``eval.attacks`` as attack kinds: ``"all"``, or ``;``-separated kinds of :data:`ATTACKS`."""
    names = [n.strip() for n in text.split(";") if n.strip()]
    if names == ["all"]:
        return ATTACKS
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ConfigError(f"eval.attacks names {unknown[0]!r}; choose among {', '.join(ATTACKS)} or all")
    return tuple(dict.fromkeys(names))


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
    return losses.LossConfig(loss=config.loss, teacher=config.teacher, prior_weight=float(config.prior_weight or 0.0),
                             preserve_weight=float(config.preserve.weight or 0.0),
                             adversarial_weight=float(config.robust.weight) if config.robust.adversarial else 0.0)


# ------------------------------------------------------------------------------------------------ the concept


def concept_from_config(config: ml_collections.ConfigDict, family: families.Family | None = None) -> concepts.Concept:
    """The :class:`~ablate_jax.concepts.Concept` a config describes: its preset, then its overrides.

    A concept whose target, kind, anchor or anchor prompts differ from its preset's (or that has
    no preset) sets part of its anchor prompts aside for evaluation and never trains on them
    (:func:`default_eval_sets`); ``family`` (read from ``config.model`` when not given) names its
    neighbours. Misspellings of the target are added when ``eval.misspelling``.
    """
    c = config.concept
    family = family or families.detect(config.model)
    return _concept(c.preset, c.kind, c.target, c.anchor, c.anchor_prompts, c.held_out,
                    tuple(config.preserve.concepts), bool(config.eval.misspelling), family)


@functools.lru_cache(maxsize=32)
def _concept(preset: str, kind: str, target: str, anchor: str, anchor_prompts: str, held_out: str,
             preserve: tuple[str, ...], misspelling: bool, family: families.Family) -> concepts.Concept:
    if preset:
        base = families.preset(preset)
        fields = dict(kind=base.kind, targets=base.targets, anchor=base.anchor, anchor_prompts=base.anchor_prompts,
                      preserve=base.preserve, eval_sets=base.eval_sets, style_templates=base.style_templates,
                      aliases=base.aliases)
    else:
        fields = dict(kind="", targets=(), anchor="", anchor_prompts=(), preserve=(), eval_sets=())
    changed = not preset
    if kind:
        fields["kind"], changed = kind, changed or kind != fields["kind"]
    if target:
        targets = concepts.parse_targets(target)
        if targets != fields["targets"]:
            # The preset's other words for its target do not name this one.
            fields["targets"], fields["aliases"], changed = targets, (), True
    if anchor:
        fields["anchor"], changed = anchor, changed or anchor != fields["anchor"]
    if anchor_prompts:
        fields["anchor_prompts"], changed = concepts.prompts_from(anchor_prompts), True
    if preserve:
        fields["preserve"] = tuple(k.strip() for k in preserve if k.strip())
    if not fields["kind"]:
        raise ConfigError("set concept.preset or concept.kind (instance, style or memorization)")
    if not fields["targets"]:
        raise ConfigError("set concept.preset or concept.target")
    if not fields["anchor_prompts"]:
        raise ConfigError("set concept.preset or concept.anchor_prompts")
    # A target is never preserved (a preset's list may name what the config now removes).
    fields["preserve"] = tuple(k for k in fields["preserve"] if k not in fields["targets"])
    held = concepts.parse_targets(held_out)
    if changed:
        # The preset's evaluation sets describe its own target; build new ones from prompts that
        # training never sees.
        fields["anchor_prompts"], fields["eval_sets"] = default_eval_sets(fields, held, family)
    else:
        if preserve:
            fields["eval_sets"] = _relabel(fields["eval_sets"], fields["preserve"])
        if held:
            raise ConfigError("concept.held_out is for a concept defined by its fields; a preset has its own "
                              "held-out sets")
    concept = concepts.Concept(**fields)
    if misspelling:
        concept = dataclasses.replace(concept, eval_sets=concept.eval_sets + concepts.misspelled_sets(concept))
    return concept


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


# Of a custom concept's usable anchor prompts, every EVAL_EVERY-th (up to EVAL_PROMPTS of them) is
# set aside for evaluation.
EVAL_EVERY = 5
EVAL_PROMPTS = 20


def split_anchor_prompts(prompts: tuple[str, ...], usable: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training prompts, evaluation prompts): every 5th usable prompt, up to 20, is held out."""
    usable = tuple(dict.fromkeys(usable))
    if len(usable) < 2:
        raise ConfigError(f"the concept has {len(usable)} usable anchor prompt(s); at least 2 are needed, since "
                          "part of them is set aside for evaluation and never trained on")
    every = min(EVAL_EVERY, len(usable))
    held = tuple(usable[i] for i in range(every - 1, len(usable), every))[:EVAL_PROMPTS]
    train = tuple(p for p in dict.fromkeys(prompts) if p not in set(held))
    return train, held


def default_eval_sets(fields: dict[str, Any], held_out: tuple[str, ...],
                      family: families.Family) -> tuple[tuple[str, ...], tuple[concepts.EvalSet, ...]]:
    """(training anchor prompts, evaluation sets) for a concept defined by its fields.

    The sets are built from anchor prompts that training never sees: target, anchor, one per
    preserved concept and one per held-out neighbour (``held_out``; by default the family's
    neighbours of the target, such as the toy world's other values of the target's attribute).
    """
    probe = concepts.Concept(**{**fields, "eval_sets": ()})
    train, prompts = split_anchor_prompts(probe.anchor_prompts, probe.usable_anchor_prompts())
    target = probe.targets[0]
    n = len(probe.targets)
    target_prompts = tuple(probe.target_prompt(p, i * n) for i, p in enumerate(prompts))
    phrase = family.set_phrase
    key = lambda c: c.replace(" ", "_")  # noqa: E731
    sets = [concepts.EvalSet(key(target), "target", phrase(target), target_prompts),
            concepts.EvalSet(key(probe.anchor), "anchor", phrase(probe.anchor), prompts)]
    sets += [concepts.EvalSet(key(k), "preserved", phrase(k),
                              tuple(probe.keep_prompt(p, k, i) for i, p in enumerate(prompts)))
             for k in probe.preserve]
    if not held_out:
        held_out = family.neighbours(probe)
    taken = {s.name for s in sets}
    for k in held_out:
        if key(k) in taken or k in probe.targets:
            continue
        sets.append(concepts.EvalSet(key(k), "surrounding", phrase(k),
                                     tuple(probe.keep_prompt(p, k, i) for i, p in enumerate(prompts))))
    return train, tuple(sets)


# ------------------------------------------------------------------------------------------------ derived settings


def anchor_sampling(config: ml_collections.ConfigDict) -> SamplingConfig:
    a = config.anchors
    return SamplingConfig(sampler=a.sampler, num_steps=a.steps, guidance_scale=a.guidance, eta=a.eta)


def eval_sampling(config: ml_collections.ConfigDict) -> SamplingConfig:
    e = config.eval
    return SamplingConfig(sampler=e.sampler, num_steps=e.steps, guidance_scale=e.guidance, eta=e.eta)


def fingerprint(config: ml_collections.ConfigDict, *keys: str) -> dict[str, Any]:
    """The config fields a workdir artefact depends on, plus a short hash of them.

    Stored beside anchors and checkpoints; a rerun whose fingerprint differs is refused rather
    than mixing two runs in one workdir (:mod:`ablate_jax.workdir`). An unresolved config is resolved
    first. A section of :data:`OFF_UNLESS_USED` is left out while its feature is off, so a run that
    does not use it keeps the identity it had before the feature existed; so is a setting of
    :data:`NEUTRAL` at its neutral value.
    """
    config = config if is_resolved(config) else resolve(config)
    flat = config.to_dict()
    picked: dict[str, Any] = {}
    for key in keys:
        if key in OFF_UNLESS_USED and not OFF_UNLESS_USED[key](config):
            continue
        node: Any = flat
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    picked = canonical_fields(picked)
    return {"fields": picked, "hash": fields_hash(picked)}


def canonical_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` (a fingerprint's, or one read back from a record) less every :data:`NEUTRAL` setting at
    its neutral value, whether the record holds it or predates it."""
    out = dict(fields)
    for name, neutral in NEUTRAL.items():
        section, _, key = name.rpartition(".")
        if out.get(name, _ABSENT) == neutral:
            del out[name]
        elif isinstance(out.get(section), Mapping) and out[section].get(key, _ABSENT) == neutral:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def fields_hash(fields: Mapping[str, Any]) -> str:
    """The short hash of fingerprint fields in canonical form: equal for a record read back from JSON and
    for the config it was written from, and for records made before a :data:`NEUTRAL` setting existed."""
    text = json.dumps(canonical_fields(fields), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_ABSENT = object()


# Sections whose feature is off by default, fingerprinted only when it is on.
OFF_UNLESS_USED = {"robust": lambda c: bool(c.robust.adversarial or c.robust.misspell or c.robust.paraphrase
                                              or c.robust.context),
                   # A run of several concepts is defined by its list, and its `concept` section is unused.
                   "concepts": lambda c: bool(c.concepts), "concept": lambda c: not c.concepts}
# Settings added to a fingerprinted section after runs were recorded with it, left out at the value that
# leaves training as it was, so that those runs keep their identity. Records are compared through
# `fields_hash` of their fields, so a record holding such a setting at that value matches too.
NEUTRAL = {"robust.context": 0.0, "robust.paraphrase": 0.0}
ANCHOR_KEYS = ("model", "seed", "concept", "concepts", "anchors.num_images", "anchors.sampler", "anchors.steps",
               "anchors.guidance", "anchors.eta", "anchors.shard_size")
# What the trained parameters depend on (checkpoints and the export record it).
TRAIN_KEYS = ANCHOR_KEYS + (
    "dtype", "params", "loss", "teacher", "prior_weight", "preserve", "stop_sot_kv_grad",
    "train.steps", "train.batch_size", "train.learning_rate", "train.weight_decay", "train.clip_norm", "train.flip",
    "train.rescale", "robust",
)
