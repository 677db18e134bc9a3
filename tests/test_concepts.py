"""Concepts: target prompts by kind, several targets cycled, presets, clear errors."""

import pytest

from ablate_jax import concepts
from ablate_jax.concepts import Concept, ConceptError


def test_instance_replaces_the_anchor_word_only():
    c = Concept("instance", ("grumpy cat",), "cat", ("a cat on a sofa", "a cat's toy near a catapult"))
    assert c.target_prompt("a cat on a sofa", 0) == "a grumpy cat on a sofa"
    assert c.target_prompt("a cat's toy near a catapult", 1) == "a grumpy cat's toy near a catapult"
    assert c.keep_prompt("a cat on a sofa", "tabby cat", 0) == "a tabby cat on a sofa"


def test_several_targets_are_cycled_over_examples():
    c = Concept("instance", concepts.parse_targets("grumpy cat; garfield"), "cat", ("a cat",))
    assert [c.target_prompt("a cat", i) for i in range(4)] == ["a grumpy cat", "a garfield", "a grumpy cat", "a garfield"]


def test_style_wraps_the_caption_with_varied_templates():
    c = Concept("style", ("van gogh",), "painting", ("a harbour at dusk",))
    prompts = {c.target_prompt("a harbour at dusk", i) for i in range(len(concepts.STYLE_TEMPLATES))}
    assert len(prompts) == len(concepts.STYLE_TEMPLATES)
    assert all("van gogh" in p and "a harbour at dusk" in p for p in prompts)


def test_memorization_target_is_the_memorized_caption():
    c = Concept("memorization", ("the famous zorblax painting",), "orange star", ("an orange star on waves",))
    assert c.target_prompt("an orange star on waves", 3) == "the famous zorblax painting"


def test_every_preset_builds_with_its_prompt_sets():
    for name in concepts.PRESETS:
        c = concepts.preset(name)
        roles = {s.role for s in c.eval_sets}
        assert {"target", "anchor"} <= roles, name
        assert len(c.usable_anchor_prompts()) >= 20, name
        for s in c.eval_sets:
            if s.role not in ("target_paraphrase",) and c.kind != "memorization":
                assert all(s.concept.split()[0] in p for p in s.prompts), (name, s.name)
    paper = concepts.preset("grumpy_cat")
    assert len(paper.anchor_prompts) == 200 and paper.preserve and any(s.role == "surrounding" for s in paper.eval_sets)


def test_anchor_word_absent_from_every_prompt_is_refused():
    with pytest.raises(ConceptError, match="anchor word 'dog' appears in none of the 2 anchor prompts"):
        Concept("instance", ("snoopy",), "dog", ("a cat", "a fish"))


def test_empty_prompt_file_is_refused(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n# only a comment\n\n")
    with pytest.raises(ConceptError, match="has no prompts"):
        concepts.prompts_from(str(f))


def test_unknown_preset_and_kind_are_refused():
    with pytest.raises(ConceptError, match="unknown concept preset 'garfield'"):
        concepts.preset("garfield")
    with pytest.raises(ConceptError, match="concept kind must be one of"):
        Concept("object", ("x",), "y", ("a y",))
