"""Concepts: target prompts by kind, several targets cycled, presets, clear errors."""

import pytest

from ablate_jax import concepts, families
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
    for name in families.presets():
        c = families.preset(name)
        roles = {s.role for s in c.eval_sets}
        assert {"target", "anchor"} <= roles, name
        assert len(c.usable_anchor_prompts()) >= 20, name
        for s in c.eval_sets:
            if s.role not in ("target_paraphrase",) and c.kind != "memorization":
                assert all(s.concept.split()[0] in p for p in s.prompts), (name, s.name)
    paper = families.preset("grumpy_cat")
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
        families.preset("garfield")
    with pytest.raises(ConceptError, match="concept kind must be one of"):
        Concept("object", ("x",), "y", ("a y",))


def _config(arg: str = ""):
    from ablate_jax.config import base_config, finalize

    return finalize(base_config(), arg)


CUSTOM = {
    "real instance": "concept.preset=,concept.kind=instance,concept.target=my character,concept.anchor=cat,"
                     "concept.anchor_prompts=anchor_cat,preserve.concepts=tabby cat,concept.held_out=persian cat",
    "real style": "concept.preset=,concept.kind=style,concept.target=my painter,concept.anchor=painting,"
                  "concept.anchor_prompts=anchor_painting,preserve.concepts=rembrandt",
    "toy instance": "concept.target=frowny,preserve.concepts=winky",
    "toy style": "concept=toy_striped,concept.target=dotted",
}


@pytest.mark.parametrize("arg", [f"concept={name}" for name in families.presets()] + list(CUSTOM.values()))
def test_no_evaluation_prompt_is_a_training_prompt(arg):
    from ablate_jax.config import concept_from_config

    concept = concept_from_config(_config(arg))
    trained = concept.training_prompts()
    assert trained and concept.eval_sets
    for s in concept.eval_sets:
        if concept.kind == "memorization" and s.role == "target":
            # The one exception: the memorized caption itself is what training maps away and
            # what evaluation asks about.
            assert set(s.prompts) == set(concept.targets), s.name
            continue
        overlap = set(s.prompts) & trained
        assert not overlap, (arg, s.name, sorted(overlap)[:3])


def test_a_custom_concept_sets_anchor_prompts_aside_and_gets_held_out_neighbours():
    from ablate_jax.config import concept_from_config

    every = concepts.builtin_prompts("anchor_cat")
    concept = concept_from_config(_config(CUSTOM["real instance"]))
    held = set(every) - set(concept.anchor_prompts)
    assert len(held) == 20 and set(concept.anchor_prompts) | held == set(every)
    roles = {s.name: s.role for s in concept.eval_sets}
    assert roles["my_character"] == "target" and roles["cat"] == "anchor"
    assert roles["tabby_cat"] == "preserved" and roles["persian_cat"] == "surrounding"
    anchor_set = next(s for s in concept.eval_sets if s.role == "anchor")
    assert set(anchor_set.prompts) == held

    # On the toy world the held-out neighbours are the target attribute's other values, named as
    # the evaluator reads them best ("dotted background", not "dotted").
    toy = concept_from_config(_config(CUSTOM["toy instance"]))
    held_out = {s.concept for s in toy.eval_sets if s.role == "surrounding"}
    assert {"smiley", "gaspy", "star", "square"} <= held_out and "circle" not in held_out and "winky" not in held_out
    style = concept_from_config(_config(CUSTOM["toy style"]))
    by_role = {s.role: s for s in style.eval_sets}
    assert by_role["target"].concept == "dotted background" and by_role["anchor"].concept == "plain background"
    assert style.preserve == ("wavy", "checkered")  # the preset's list, less the new target
    assert {s.concept for s in style.eval_sets if s.role == "surrounding"} == {"striped background"}


def test_misspellings_change_the_word_naming_the_target_in_several_ways():
    from ablate_jax.config import concept_from_config

    assert concepts.target_word(("grumpy cat",), "cat") == "grumpy"
    assert concepts.target_word(("van gogh",), "painting") == "gogh"
    wrong = concepts.misspellings("smiley")
    assert wrong == {"doubled": "smilley", "dropped": "smiey", "swapped": "smiely", "substituted": "smimey"}
    concept = concept_from_config(_config("concept=grumpy_cat"))
    sets = [s for s in concept.eval_sets if "_misspelled_" in s.name]
    assert len(sets) >= 3 and all(s.role == "target_paraphrase" for s in sets)
    target = next(s for s in concept.eval_sets if s.name == "grumpy_cat")
    for s in sets:
        assert len(s.prompts) == len(target.prompts)
        for before, after in zip(target.prompts, s.prompts, strict=True):
            assert "grumpy" in before and "grumpy" not in after and after.count(" cat") == before.count(" cat")
    assert not any("_misspelled_" in s.name for s in concept_from_config(_config("concept=toy_memorized")).eval_sets)
    assert not any("_misspelled_" in s.name for s in concept_from_config(_config("eval.misspelling=false")).eval_sets)
