"""Concepts to ablate and the prompts built from them (DESIGN.md section 1.2).

A concept names what to remove (``targets``), what it should look like instead (``anchor``),
the anchor prompts the pretrained model draws training images from, the surrounding concepts
that training preserves, and the evaluation sets. Target prompts are built from anchor
prompts by kind: ``instance`` replaces the anchor word, ``style`` wraps the caption,
``memorization`` uses the memorized caption (or a paraphrase that still reproduces it).
Several targets are cycled over the examples.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

KINDS = ("instance", "style", "memorization")
ROLES = ("target", "target_paraphrase", "anchor", "preserved", "surrounding")

# Wrapping templates for style targets ({p}: the anchor caption, {t}: the style; {pt}: the
# caption with the anchor word replaced by the style, for worlds whose captions name styles).
STYLE_TEMPLATES = (
    "{p}, in the style of {t}",
    "in {t}'s style, {p}",
    "{t} inspired painting, {p}",
    "{p}, art by {t}",
    "a painting by {t}: {p}",
)


class ConceptError(ValueError):
    """A concept or its prompts cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Prompts to draw evaluation images from, and the concept CLIP should (or should not) see."""

    name: str
    role: str
    concept: str
    prompts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Concept:
    """Everything the method needs to know about one ablation."""

    kind: str
    targets: tuple[str, ...]
    anchor: str
    anchor_prompts: tuple[str, ...]
    preserve: tuple[str, ...] = ()
    eval_sets: tuple[EvalSet, ...] = ()
    style_templates: tuple[str, ...] = STYLE_TEMPLATES

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConceptError(f"concept kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.targets or not all(t.strip() for t in self.targets):
            raise ConceptError("concept target is empty")
        if not self.anchor_prompts:
            raise ConceptError("the concept has no anchor prompts")
        if self.kind == "instance":
            usable = [p for p in self.anchor_prompts if _word(self.anchor).search(p)]
            if not usable:
                raise ConceptError(
                    f"the anchor word {self.anchor!r} appears in none of the {len(self.anchor_prompts)} anchor prompts, "
                    "so no target prompt can be built from them"
                )
        for s in self.eval_sets:
            if s.role not in ROLES:
                raise ConceptError(f"evaluation set {s.name!r}: role must be one of {', '.join(ROLES)}, got {s.role!r}")

    @property
    def target(self) -> str:
        """The targets as given in a config (``;``-separated)."""
        return ";".join(self.targets)

    def usable_anchor_prompts(self) -> tuple[str, ...]:
        """Anchor prompts that target prompts can be built from (for instances: those naming the anchor)."""
        if self.kind != "instance":
            return self.anchor_prompts
        return tuple(p for p in self.anchor_prompts if _word(self.anchor).search(p))

    def target_prompt(self, anchor_prompt: str, index: int) -> str:
        """The target prompt for example ``index`` (its global index cycles targets and templates)."""
        target = self.targets[index % len(self.targets)]
        if self.kind == "instance":
            return replace_word(anchor_prompt, self.anchor, target)
        if self.kind == "style":
            template = self.style_templates[(index // len(self.targets)) % len(self.style_templates)]
            return template.format(p=anchor_prompt, t=target, pt=replace_word(anchor_prompt, self.anchor, target))
        return target  # memorization: the memorized caption or one of its paraphrases

    def keep_prompt(self, anchor_prompt: str, keep: str, index: int) -> str:
        """The anchor prompt with the anchor swapped for a concept to preserve."""
        if self.kind == "style":
            template = self.style_templates[index % len(self.style_templates)]
            return template.format(p=anchor_prompt, t=keep, pt=replace_word(anchor_prompt, self.anchor, keep))
        return replace_word(anchor_prompt, self.anchor, keep)

    def training_prompts(self) -> frozenset[str]:
        """Every prompt training conditions on (before augmentation prefixes): anchor, target and kept prompts."""
        out = set(self.anchor_prompts)
        cycle = len(self.targets) * max(1, len(self.style_templates))
        for p in self.usable_anchor_prompts():
            out.update(self.target_prompt(p, i) for i in range(cycle))
            for keep in self.preserve:
                out.update(self.keep_prompt(p, keep, i) for i in range(max(1, len(self.style_templates))))
        return frozenset(out)


def _word(word: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.IGNORECASE)


def replace_word(text: str, word: str, replacement: str) -> str:
    """Replaces whole-word occurrences of ``word`` (case-insensitive)."""
    return _word(word).sub(lambda _: replacement, text)  # the replacement is text, never a pattern


MISSPELLINGS = ("doubled", "dropped", "swapped", "substituted")


def target_word(targets: Sequence[str], anchor: str) -> str:
    """The word that names the target: the longest word of the first target that the anchor does not use.

    "grumpy cat" with anchor "cat" -> "grumpy"; "van gogh" -> "gogh"; "smiley" -> "smiley".
    """
    words = [w for w in re.findall(r"[\w'-]+", targets[0])]
    anchor_words = {w.lower() for w in re.findall(r"[\w'-]+", anchor)}
    own = [w for w in words if w.lower() not in anchor_words] or words
    return max(own, key=len) if own else targets[0]


def _next_letter(ch: str) -> str:
    vowels = "aeiou"
    if ch.lower() in vowels:
        return vowels[(vowels.index(ch.lower()) + 1) % len(vowels)]
    consonants = "bcdfghjklmnpqrstvwxyz"
    if ch.lower() in consonants:
        return consonants[(consonants.index(ch.lower()) + 1) % len(consonants)]
    return "x" if ch != "x" else "y"


def misspellings(word: str) -> dict[str, str]:
    """One-letter misspellings of ``word`` by kind, each different from the word and from each other.

    Around the middle letter ``i``: ``doubled`` ("smiley" -> "smilley"), ``dropped`` ("smiey"),
    ``swapped`` with the next letter ("smiely"), ``substituted`` by the next vowel or consonant
    ("smimey"). A kind that cannot change a word this short is left out.
    """
    n = len(word)
    if n < 2:
        return {}
    i = n // 2
    j = i if i + 1 < n else i - 1  # swap letters j and j + 1
    candidates = {
        "doubled": word[: i + 1] + word[i:],
        "dropped": word[:i] + word[i + 1 :],
        "swapped": word[:j] + word[j + 1] + word[j] + word[j + 2 :],
        "substituted": word[:i] + _next_letter(word[i]) + word[i + 1 :],
    }
    out: dict[str, str] = {}
    for kind in MISSPELLINGS:
        wrong = candidates[kind]
        if wrong != word and wrong not in out.values():
            out[kind] = wrong
    return out


def misspell(text: str) -> str:
    """The ``doubled`` misspelling of the last word of ``text`` ("smiley" -> "smilley")."""
    words = text.split(" ")
    words[-1] = misspellings(words[-1]).get("doubled", words[-1])
    return " ".join(words)


def misspelled_sets(concept: Concept) -> tuple[EvalSet, ...]:
    """For each target set, one set per kind of one-letter misspelling of the word naming the target.

    Only that word changes ("a grumpy cat" -> "a grumpi cat", never "a grumpy caat"); each set has
    role ``target_paraphrase`` and is named ``SET_misspelled_KIND``. Memorized captions have none.
    """
    if concept.kind == "memorization":
        return ()
    word = target_word(concept.targets, concept.anchor)
    out = []
    for s in concept.eval_sets:
        if s.role != "target":
            continue
        for kind, wrong in misspellings(word).items():
            prompts = tuple(replace_word(p, word, wrong) for p in s.prompts)
            if prompts != s.prompts:
                out.append(EvalSet(f"{s.name}_misspelled_{kind}", "target_paraphrase", s.concept, prompts))
    return tuple(out)


def parse_targets(target: str) -> tuple[str, ...]:
    """``"grumpy cat; grumpy kitten"`` -> ("grumpy cat", "grumpy kitten")."""
    return tuple(t.strip() for t in target.split(";") if t.strip())


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and ``#`` comments are skipped. An empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConceptError(f"prompt file {path} does not exist")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    if not prompts:
        raise ConceptError(f"prompt file {path} has no prompts")
    return prompts


def builtin_prompts(name: str) -> tuple[str, ...]:
    """A prompt set that ships with the package (``anchor_cat``, ``eval/grumpy_cat``, ...)."""
    ref = resources.files("ablate_jax") / "prompts" / f"{name}.txt"
    if not ref.is_file():
        raise ConceptError(f"no built-in prompt set named {name!r}")
    return read_prompt_file(Path(str(ref)))


def prompts_from(source: str | Sequence[str]) -> tuple[str, ...]:
    """Prompts from a file path, a built-in set name, or a list given directly."""
    if not isinstance(source, str):
        prompts = tuple(p.strip() for p in source if p.strip())
        if not prompts:
            raise ConceptError("the prompt list is empty")
        return prompts
    if source.endswith(".txt") or "/" in source or Path(source).exists():
        return read_prompt_file(source)
    return builtin_prompts(source)


# ------------------------------------------------------------------------------------------------ presets


def _instance(target: str, anchor: str, anchor_set: str, preserve: tuple[str, ...], held_out: tuple[str, ...],
              paraphrase: bool = True) -> Concept:
    key = lambda c: c.replace(" ", "_").replace("-", "_")  # noqa: E731
    sets = [EvalSet(key(target), "target", target, builtin_prompts(f"eval/{key(target)}"))]
    if paraphrase:
        sets.append(EvalSet(f"{key(target)}_paraphrase", "target_paraphrase", target,
                            builtin_prompts(f"eval/{key(target)}_paraphrase")))
    sets.append(EvalSet(key(anchor), "anchor", anchor, builtin_prompts(f"eval/{key(anchor)}")))
    sets += [EvalSet(key(c), "preserved", c, builtin_prompts(f"eval/{key(c)}")) for c in preserve]
    sets += [EvalSet(key(c), "surrounding", c, builtin_prompts(f"eval/{key(c)}")) for c in held_out]
    return Concept("instance", (target,), anchor, builtin_prompts(anchor_set), preserve, tuple(sets))


def _style(target: str, preserve: tuple[str, ...], held_out: tuple[str, ...], paraphrase: bool = False) -> Concept:
    key = lambda c: c.replace(" ", "_")  # noqa: E731
    sets = [EvalSet(key(target), "target", target, builtin_prompts(f"eval/{key(target)}"))]
    if paraphrase:
        sets.append(EvalSet(f"{key(target)}_paraphrase", "target_paraphrase", target,
                            builtin_prompts(f"eval/{key(target)}_paraphrase")))
    sets.append(EvalSet("painting", "anchor", "painting", builtin_prompts("eval/painting")))
    sets += [EvalSet(key(c), "preserved", c, builtin_prompts(f"eval/{key(c)}")) for c in preserve]
    sets += [EvalSet(key(c), "surrounding", c, builtin_prompts(f"eval/{key(c)}")) for c in held_out]
    return Concept("style", (target,), "painting", builtin_prompts("anchor_painting"), preserve, tuple(sets))


def toy_concept_phrase(value: str) -> str:
    """What a toy-world attribute value is called in an evaluation set: "dotted" -> "dotted background"."""
    from ablate_jax.toy import world  # noqa: PLC0415

    try:
        attribute = world.concept_attribute(value)
    except ValueError:
        return value
    return f"{value} background" if attribute == "background" else value


def toy_neighbours(concept: Concept) -> tuple[str, ...]:
    """The other values of the toy-world attribute the target belongs to, less the anchor and the preserved ones.

    A target that is no toy-world value ("my character") has none.
    """
    from ablate_jax.toy import world  # noqa: PLC0415

    target = concept.targets[0]
    try:
        attribute = world.concept_attribute(target)
    except ValueError:
        return ()
    skip = {*concept.targets, concept.anchor, *concept.preserve}
    return tuple(v for v in world.all_concepts()[attribute] if v not in skip)


def _toy_prompts(word: str, n: int, seed: int, exclude: frozenset[str] = frozenset(),
                 **scene_kwargs) -> tuple[str, ...]:
    """``n`` distinct toy-world captions that contain ``word`` and are not in ``exclude``, of scenes drawn
    with ``scene_kwargs``."""
    from ablate_jax.toy import world  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}
    for _ in range(1000 * n):
        scene = world.sample_scene(rng, **scene_kwargs)
        text = world.caption(scene, rng, describe=False)
        if _word(word).search(text) and text not in exclude:
            prompts.setdefault(text)
            if len(prompts) == n:
                return tuple(prompts)
    raise ConceptError(f"the toy world has fewer than {n} captions with {word!r}")


def _toy_instance() -> Concept:
    from ablate_jax.toy import world  # noqa: PLC0415

    anchor_prompts = _toy_prompts("circle", 200, seed=1, shapes=["circle"])
    # Two of the three face siblings are kept in training; gaspy is held out to measure how far
    # that carries. With the frowny alone preserved, the held-out winky (the closest face: the
    # same smile, one eye closed) lost a third of its images.
    trained = Concept("instance", ("smiley",), "circle", anchor_prompts, ("frowny", "winky")).training_prompts()

    def eval_set(name: str, role: str, concept: str, shape: str) -> EvalSet:
        return EvalSet(name, role, concept, _toy_prompts(shape, 20, seed=zlib.crc32(name.encode()), exclude=trained,
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
    return Concept("instance", ("smiley",), "circle", anchor_prompts, ("frowny", "winky"), sets)


def _toy_style() -> Concept:
    anchor_prompts = _toy_prompts("plain", 200, 2, backgrounds=["plain"])
    # Every other style of the world is preserved. With the dotted style alone preserved, the other
    # patterns drifted towards plain along with the stripes, and each style added to the term held
    # more of the rest (README, "Results on the toy world").
    preserve = ("dotted", "wavy", "checkered")
    trained = Concept("style", ("striped",), "plain", anchor_prompts, preserve, style_templates=("{pt}",)
                      ).training_prompts()

    def prompts(background: str, seed: int) -> tuple[str, ...]:
        return _toy_prompts(background, 20, seed, exclude=trained, backgrounds=[background])

    sets = (
        EvalSet("striped", "target", "striped background", prompts("striped", 8001)),
        EvalSet("plain", "anchor", "plain background", prompts("plain", 8002)),
        EvalSet("dotted", "preserved", "dotted background", prompts("dotted", 8003)),
        EvalSet("checkered", "preserved", "checkered background", prompts("checkered", 8004)),
        EvalSet("wavy", "preserved", "wavy background", prompts("wavy", 8005)),
    )
    return Concept("style", ("striped",), "plain", anchor_prompts, preserve, sets, style_templates=("{pt}",))


def _toy_memorized() -> Concept:
    from ablate_jax.toy import world  # noqa: PLC0415

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
        EvalSet("star", "surrounding", "star", _toy_prompts("star", 20, seed=9001, exclude=concept.training_prompts(),
                                                           shapes=["star"])),
    )
    return dataclasses.replace(concept, eval_sets=sets)


_CATS = ("tabby cat", "siamese cat", "persian cat", "sphynx cat")
_DOGS = ("beagle", "golden retriever", "dalmatian", "corgi")
_FISH = ("goldfish", "angelfish", "betta fish", "pufferfish")
_ROBOTS = ("c3po", "wall-e", "bb8", "industrial robot")
_PAINTERS = ("paul cezanne", "pablo picasso", "rembrandt", "frida kahlo", "edvard munch", "katsushika hokusai")

PRESETS = {
    "grumpy_cat": lambda: _instance("grumpy cat", "cat", "anchor_cat", _CATS[:2], _CATS[2:]),
    "snoopy": lambda: _instance("snoopy", "dog", "anchor_dog", _DOGS[:2], _DOGS[2:]),
    "nemo": lambda: _instance("nemo", "fish", "anchor_fish", _FISH[:2], _FISH[2:]),
    "r2d2": lambda: _instance("r2d2", "robot", "anchor_robot", _ROBOTS[:2], _ROBOTS[2:]),
    "van_gogh": lambda: _style("van gogh", _PAINTERS[:3], _PAINTERS[3:], paraphrase=True),
    "monet": lambda: _style("monet", _PAINTERS[:3], _PAINTERS[3:]),
    "salvador_dali": lambda: _style("salvador dali", _PAINTERS[:3], _PAINTERS[3:]),
    "greg_rutkowski": lambda: _style("greg rutkowski", _PAINTERS[:3], _PAINTERS[3:]),
    "toy_smiley": _toy_instance,
    "toy_striped": _toy_style,
    "toy_memorized": _toy_memorized,
}


@functools.cache
def preset(name: str) -> Concept:
    """A named concept: the paper's (grumpy_cat, snoopy, nemo, r2d2, van_gogh, monet, salvador_dali,
    greg_rutkowski) or the toy world's (toy_smiley, toy_striped, toy_memorized)."""
    if name not in PRESETS:
        raise ConceptError(f"unknown concept preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
