"""Concepts to ablate and the prompts built from them (docs/design.md, "Concepts and evaluation prompts").

A concept names what to remove (``targets``), what it should look like instead (``anchor``),
the anchor prompts the pretrained model draws training images from, the surrounding concepts
that training preserves, and the evaluation sets. Target prompts are built from anchor
prompts by kind: ``instance`` replaces the anchor word, ``style`` wraps the caption,
``memorization`` uses the memorized caption (or a paraphrase that still reproduces it).
Several targets are cycled over the examples.
"""

from __future__ import annotations

import dataclasses
import re
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
    # Other words prompts use for the target ("stripy", "stripes" for "striped"). Beside other concepts
    # they mark the prompts that are about this one (docs/many-concepts.md); paraphrase augmentation
    # names the target by them (docs/attacks.md).
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConceptError(f"concept kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.targets or not all(t.strip() for t in self.targets):
            raise ConceptError("concept target is empty")
        if not all(a.strip() for a in self.aliases):
            raise ConceptError("a concept alias is empty")
        if not self.anchor_prompts:
            raise ConceptError("the concept has no anchor prompts")
        if self.kind == "instance":
            usable = [p for p in self.anchor_prompts if word_pattern(self.anchor).search(p)]
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

    @property
    def names(self) -> tuple[str, ...]:
        """Every word that names the target in a prompt: the targets, then the aliases."""
        return self.targets + tuple(a for a in self.aliases if a not in self.targets)

    def usable_anchor_prompts(self) -> tuple[str, ...]:
        """Anchor prompts that target prompts can be built from (for instances: those naming the anchor)."""
        if self.kind != "instance":
            return self.anchor_prompts
        return tuple(p for p in self.anchor_prompts if word_pattern(self.anchor).search(p))

    def target_prompt(self, anchor_prompt: str, index: int, name: str | None = None) -> str:
        """The target prompt for example ``index`` (its global index cycles targets and templates);
        ``name``: another word for the target to use instead (one of the aliases)."""
        target = name or self.targets[index % len(self.targets)]
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


def word_pattern(word: str) -> re.Pattern[str]:
    """``word`` as a whole word (not inside another word or a hyphenated one), case-insensitive."""
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.IGNORECASE)


def replace_word(text: str, word: str, replacement: str) -> str:
    """Replaces whole-word occurrences of ``word`` (case-insensitive)."""
    return word_pattern(word).sub(lambda _: replacement, text)  # the replacement is text, never a pattern


MISSPELLINGS = ("doubled", "dropped", "swapped", "substituted")
# Further one-letter variants that attacks try (evaluation sets use MISSPELLINGS only).
MORE_MISSPELLINGS = ("inserted", "split")


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


def misspellings(word: str, *, extended: bool = False) -> dict[str, str]:
    """One-letter misspellings of ``word`` by kind, each different from the word and from each other.

    Around the middle letter ``i``: ``doubled`` ("smiley" -> "smilley"), ``dropped`` ("smiey"),
    ``swapped`` with the next letter ("smiely"), ``substituted`` by the next vowel or consonant
    ("smimey"); with ``extended`` also ``inserted`` (the next vowel or consonant after the one
    at ``i`` put before it: "smimley") and ``split`` by a space ("smi ley"). A kind that cannot
    change a word this short is left out.
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
        "inserted": word[:i] + _next_letter(word[i]) + word[i:],
        "split": word[:i] + " " + word[i:],
    }
    out: dict[str, str] = {}
    for kind in MISSPELLINGS + (MORE_MISSPELLINGS if extended else ()):
        wrong = candidates[kind]
        if wrong != word and wrong not in out.values():
            out[kind] = wrong
    return out


def random_misspelling(word: str, rng: np.random.Generator, avoid: Sequence[str] = ()) -> str:
    """``word`` with one letter doubled, dropped, swapped with the next, replaced or inserted, or split by a
    space, at a random position; never a string of ``avoid`` (the attacks' own variants) nor the word itself."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(100):
        i = int(rng.integers(len(word)))
        kind = int(rng.integers(6))
        c = letters[int(rng.integers(26))]
        if kind == 0:
            out = word[: i + 1] + word[i:]
        elif kind == 1 and len(word) > 2:
            out = word[:i] + word[i + 1 :]
        elif kind == 2 and i + 1 < len(word):
            out = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        elif kind == 3:
            out = word[:i] + c + word[i + 1 :]
        elif kind == 5 and i > 0:
            out = word[:i] + " " + word[i:]
        else:
            out = word[:i] + c + word[i:]
        if out != word and out not in avoid:
            return out
    return word


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
