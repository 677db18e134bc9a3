"""Model families: what differs between the models a run can ablate, as data (docs/design.md, "Model families").

A :class:`Family` record holds everything the method and the stages would otherwise ask "is this
the toy world?" about: the learning rate and steps per parameter group, the anchor count, the
preservation weight, the evaluator and how it is phrased, the memorization measure, the concept
presets, and the named models it ships. :func:`detect` reads the family from a model folder (a
marker file, or diffusers' ``unet/config.json``) once; the stages receive the record and never
look at the model's name again.

Families are plugins: :data:`FAMILY_MODULES` names the modules that define them, imported on
first use, so the core's imports never reach a family's own world (the toy world's renderer,
captions and copy detector stay in :mod:`ablate_jax.toy`). Each module exports ``FAMILIES`` (its
records, most specific first) and ``detect(model) -> Family | None``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from ablate_jax.concepts import Concept

# Asked in this order; the last module's detect claims every model the others do not.
FAMILY_MODULES = ("ablate_jax.toy.family", "ablate_jax.families.stable_diffusion")

# The evaluator a real model is scored with when eval.clip is not set: the CLIP the paper measures with.
REAL_EVALUATOR = "openai/clip-vit-large-patch14"


class FamilyError(ValueError):
    """A family name or a model that no family claims; the message says which."""


def _same(text: str) -> str:
    return text


def _none(concept: Concept) -> tuple[str, ...]:
    return ()


def _no_named(name: str, component: str) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class CopyDetector:
    """A family's own measure of whether an image reproduces its memorized picture: ``similarity > threshold``."""

    name: str
    threshold: float
    similarity: Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float [N]


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """What a run needs to know about a model family. Compared (and hashed) by identity: one record per family."""

    name: str  # "toy", "sd1", "sd2", "sd": written into the resolved config
    title: str  # how logs and notes name it
    # (learning rate, steps) per parameter group, for a global batch of 8.
    schedule: Mapping[str, tuple[float, int]]
    anchor_count: int
    # Sequential VAE encoder calls per train step (train.encode_chunks when unset).
    encode_chunks: int
    # Preservation weight per loss for the parameter groups in preserve_groups (0 elsewhere).
    preserve_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    preserve_groups: tuple[str, ...] = ()
    evaluator: str = REAL_EVALUATOR  # eval.clip when unset
    # Named models the family ships: name -> {component ("pipeline" or "clip") -> folder}.
    named: Callable[[str, str], str | None] = _no_named
    # How an evaluation set built from a concept's fields names a neighbour ("dotted" -> "dotted background").
    set_phrase: Callable[[str], str] = _same
    # How the family's own evaluator is asked about a concept, inside "A photo depicts {}".
    evaluator_phrase: Callable[[str], str] = _same
    # Neighbours held out by default for a concept defined by its fields.
    neighbours: Callable[[Concept], tuple[str, ...]] = _none
    # The family's own copy detector for memorized images; None: CLIP image similarity.
    copy_detector: Callable[[], CopyDetector] | None = None
    presets: Mapping[str, Callable[[], Concept]] = dataclasses.field(default_factory=dict)

    def preserve_weight(self, params: str, loss: str) -> float | None:
        """The family's preservation weight for a group and loss, or None where it keeps none."""
        if params not in self.preserve_groups:
            return None
        return self.preserve_weights.get(loss)


@functools.cache
def _modules() -> tuple[object, ...]:
    return tuple(importlib.import_module(name) for name in FAMILY_MODULES)


def all_families() -> tuple[Family, ...]:
    """Every registered family, in the order :data:`FAMILY_MODULES` lists their modules."""
    return tuple(f for m in _modules() for f in m.FAMILIES)  # type: ignore[attr-defined]


def by_name(name: str) -> Family:
    """The family called ``name`` (``toy``, ``sd1``, ``sd2``, ``sd``)."""
    for family in all_families():
        if family.name == name:
            return family
    raise FamilyError(f"unknown model family {name!r}; choose one of {', '.join(f.name for f in all_families())}")


def detect(model: str) -> Family:
    """The family of a model folder, hub id or named model, read from small files only (no weights)."""
    for module in _modules():
        family = module.detect(str(model))  # type: ignore[attr-defined]
        if family is not None:
            return family
    raise FamilyError(f"no model family claims {model!r}")  # the last module claims everything


def named_model(name: str, component: str = "pipeline") -> str | None:
    """The folder of a model a family ships under a name (``"toy"``), or None when no family has one."""
    for family in all_families():
        path = family.named(name, component)
        if path:
            return path
    return None


def presets() -> dict[str, Callable[[], Concept]]:
    """Every family's concept presets by name."""
    out: dict[str, Callable[[], Concept]] = {}
    for family in all_families():
        out.update(family.presets)
    return out


@functools.cache
def preset(name: str) -> Concept:
    """A named concept: the paper's (grumpy_cat, snoopy, van_gogh, ...) or the toy world's (toy_smiley, ...)."""
    from ablate_jax.concepts import ConceptError  # noqa: PLC0415

    available = presets()
    if name not in available:
        raise ConceptError(f"unknown concept preset {name!r}; choose one of {', '.join(sorted(available))}")
    return available[name]()
