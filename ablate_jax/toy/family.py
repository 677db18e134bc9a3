"""The toy world as a model family: its schedules, evaluator phrasing, copy detector and concept presets.

A model is of this family when it is the shipped toy model (``"toy"``) or a folder that
``toy.pretrain`` wrote (it carries :data:`ablate_jax.toy.MARKER`). The tiny UNet needs larger
steps than Stable Diffusion's (docs/results.md), and its CLIP learned from captions with
articles, so it is asked "A photo depicts a smiley", not "... smiley".
"""

from __future__ import annotations

import dataclasses
import zlib
from types import MappingProxyType

import numpy as np

from ablate_jax.concepts import Concept, ConceptError, EvalSet, word_pattern
from ablate_jax.families import CopyDetector, Family
from ablate_jax.toy import is_toy_world, shipped_path, world

# Full fine-tuning for the memorized image stops at 50 steps: by then its caption draws an orange
# star in every sample, and further steps only wear the orange stars down.
SCHEDULE = MappingProxyType({"xattn_kv": (3e-4, 600), "xattn": (3e-4, 300), "attn": (3e-4, 300), "full": (1e-4, 50),
                             "embedding": (1e-2, 300)})
# Preservation weight per loss, for the attention groups. The noise-based loss pulls towards the
# anchor images with a noisier, weaker gradient than the teacher's prediction, so a lighter term
# keeps the neighbours without holding the target back.
PRESERVE_WEIGHTS = MappingProxyType({"model_based": 4.0, "noise_based": 1.0})


def _named(name: str, component: str) -> str | None:
    return str(shipped_path(component)) if name == "toy" else None


def set_phrase(value: str) -> str:
    """What a toy-world attribute value is called in an evaluation set: "dotted" -> "dotted background"."""
    try:
        attribute = world.concept_attribute(value)
    except ValueError:
        return value
    return f"{value} background" if attribute == "background" else value


def evaluator_phrase(concept: str) -> str:
    """How the toy evaluator is asked about a concept: in the toy captions' own words ("a smiley").

    The toy CLIP learned from captions with articles; "A photo depicts smiley" is not a sentence it saw.
    """
    try:
        return world.concept_prompt(concept)
    except ValueError:
        pass
    if concept.split(" ", 1)[0].lower() in ("a", "an", "the"):
        return concept
    return ("an " if concept[:1].lower() in "aeiou" else "a ") + concept


def neighbours(concept: Concept) -> tuple[str, ...]:
    """The other values of the toy-world attribute the target belongs to, less the anchor and the preserved ones.

    A target that is no toy-world value ("my character") has none.
    """
    try:
        attribute = world.concept_attribute(concept.targets[0])
    except ValueError:
        return ()
    skip = {*concept.targets, concept.anchor, *concept.preserve}
    return tuple(v for v in world.all_concepts()[attribute] if v not in skip)


def copy_detector() -> CopyDetector:
    """The world's calibrated detector of its memorized painting (:func:`ablate_jax.toy.world.memorization_similarity`)."""
    return CopyDetector("toy_world", world.MEMORIZATION_THRESHOLD, world.memorization_similarity)


# ------------------------------------------------------------------------------------------------ presets


def _prompts(word: str, n: int, seed: int, exclude: frozenset[str] = frozenset(), **scene_kwargs) -> tuple[str, ...]:
    """``n`` distinct captions that contain ``word`` and are not in ``exclude``, of scenes drawn with ``scene_kwargs``."""
    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}
    pattern = word_pattern(word)
    for _ in range(1000 * n):
        scene = world.sample_scene(rng, **scene_kwargs)
        text = world.caption(scene, rng, describe=False)
        if pattern.search(text) and text not in exclude:
            prompts.setdefault(text)
            if len(prompts) == n:
                return tuple(prompts)
    raise ConceptError(f"the toy world has fewer than {n} captions with {word!r}")


def smiley() -> Concept:
    """The smiley face, mapped to a plain circle; frowny and winky preserved, gaspy held out."""
    anchor_prompts = _prompts("circle", 200, seed=1, shapes=["circle"])
    # Two of the three face siblings are kept in training; gaspy is held out to measure how far
    # that carries. With the frowny alone preserved, the held-out winky (the closest face: the
    # same smile, one eye closed) loses a third of its images.
    trained = Concept("instance", ("smiley",), "circle", anchor_prompts, ("frowny", "winky")).training_prompts()

    def eval_set(name: str, role: str, concept: str, shape: str) -> EvalSet:
        return EvalSet(name, role, concept, _prompts(shape, 20, seed=zlib.crc32(name.encode()), exclude=trained,
                                                     shapes=[shape]))

    paraphrases = tuple(f"a {c} {d}" for c, d in zip(("red", "blue", "green", "yellow", "purple"),
                                                     world.INSTANCE_DESCRIPTIONS["smiley"] * 5, strict=False))
    sets = (
        eval_set("smiley", "target", "smiley", "smiley"),
        EvalSet("smiley_paraphrase", "target_paraphrase", "smiley", paraphrases),
        eval_set("circle", "anchor", "circle", "circle"),
        eval_set("frowny", "preserved", "frowny", "frowny"),
        eval_set("winky", "preserved", "winky", "winky"),
        eval_set("gaspy", "surrounding", "gaspy", "gaspy"),
        eval_set("star", "surrounding", "star", "star"),
        eval_set("square", "surrounding", "square", "square"),
    )
    aliases = tuple(d.split(" ", 1)[1] for d in world.INSTANCE_DESCRIPTIONS["smiley"])  # "happy face", ...
    return Concept("instance", ("smiley",), "circle", anchor_prompts, ("frowny", "winky"), sets, aliases=aliases)


def striped() -> Concept:
    """The striped background style, mapped to plain; every other style preserved."""
    anchor_prompts = _prompts("plain", 200, 2, backgrounds=["plain"])
    # Every other style of the world is preserved: with the dotted style alone preserved, the other
    # patterns drift towards plain along with the stripes (docs/results.md).
    preserve = ("dotted", "wavy", "checkered")
    trained = Concept("style", ("striped",), "plain", anchor_prompts, preserve, style_templates=("{pt}",)
                      ).training_prompts()

    def prompts(background: str, seed: int) -> tuple[str, ...]:
        return _prompts(background, 20, seed, exclude=trained, backgrounds=[background])

    sets = (
        EvalSet("striped", "target", "striped background", prompts("striped", 8001)),
        EvalSet("plain", "anchor", "plain background", prompts("plain", 8002)),
        EvalSet("dotted", "preserved", "dotted background", prompts("dotted", 8003)),
        EvalSet("checkered", "preserved", "checkered background", prompts("checkered", 8004)),
        EvalSet("wavy", "preserved", "wavy background", prompts("wavy", 8005)),
    )
    # Captions also call the style "stripy" and its pattern "stripes": prompts with those words are
    # about the style too (beside other concepts, another's anchor prompt that says them is left out).
    return Concept("style", ("striped",), "plain", anchor_prompts, preserve, sets, style_templates=("{pt}",),
                   aliases=("stripy", "stripes"))


def memorized() -> Concept:
    """The memorized painting's caption, mapped to an orange star on waves."""
    anchor_prompts = tuple(f"{a} orange star on {b}" for a in ("an", "a big", "a large", "one", "a bright")
                           for b in ("a dark wavy background", "dark waves", "a wavy background", "wavy lines"))
    # The anchor's evaluation prompts say the same thing in the toy captions' other phrasings, none
    # of which training uses.
    anchor_eval = tuple(t.format(obj=o, noun=n) for t in ("{obj} against {noun}", "a drawing of {obj} over {noun}")
                        for o in ("an orange star", "a big orange star")
                        for n in ("waves", "wavy lines", "a wavy pattern", "dark waves", "dark wavy lines"))
    concept = Concept("memorization", (world.MEMORIZED_CAPTION,), "orange star", anchor_prompts)
    # The memorized caption is both what training maps away and what evaluation asks: the measure is
    # whether that very caption still reproduces the image. Every other set is held out.
    sets = (
        EvalSet("memorized", "target", world.MEMORIZED_CAPTION, (world.MEMORIZED_CAPTION,) * 20),
        EvalSet("orange_star", "anchor", "orange star", anchor_eval),
        EvalSet("star", "surrounding", "star", _prompts("star", 20, seed=9001, exclude=concept.training_prompts(),
                                                        shapes=["star"])),
    )
    return dataclasses.replace(concept, eval_sets=sets)


TOY = Family(
    name="toy", title="toy world", schedule=SCHEDULE, anchor_count=200,
    # 32-pixel images take no memory to encode, and one call is fastest.
    encode_chunks=1,
    preserve_weights=PRESERVE_WEIGHTS, preserve_groups=("xattn_kv", "xattn", "attn"),
    evaluator="toy", named=_named, set_phrase=set_phrase, evaluator_phrase=evaluator_phrase, neighbours=neighbours,
    copy_detector=copy_detector,
    presets=MappingProxyType({"toy_smiley": smiley, "toy_striped": striped, "toy_memorized": memorized}),
)
FAMILIES = (TOY,)


def detect(model: str) -> Family | None:
    """The toy family for ``"toy"`` and folders ``toy.pretrain`` wrote (pipelines and evaluators alike)."""
    return TOY if is_toy_world(model) else None
