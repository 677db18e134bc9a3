"""Attacks that try to bring the removed concept back, on the shipped toy model.

An attack that cannot draw the target from the *base* model is broken, not a defence: the
learned attacks and the paraphrases must succeed there. (The base model itself reads most
misspellings as something other than a smiley, so they are not held to that.)
"""

import copy
import dataclasses
import re

import numpy as np
import pytest

from ablate_jax import attacks, evaluate, sharding, text_to_image
from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax.config import ConfigError, base_config
from ablate_jax.models import load_clip, load_pipeline
from ablate_jax.report import check_report, format_markdown, format_table
from ablate_jax.toy import shipped_path


@pytest.fixture(scope="module")
def toy():
    return load_pipeline(shipped_path("pipeline")), load_clip(shipped_path("clip"))


def _spec(**values):
    c = base_config()
    c.eval.num_images, c.eval.sets = 8, "smiley"
    for key, value in values.items():
        config_lib.override(c, key, str(value))
    c.lock()
    return config_lib.prepare(c)


def test_misspellings_are_five_or_more_variants_each_tokenised_differently(toy):
    pipe, _ = toy
    spec = _spec()
    tok = pipe.tokenizer
    found = attacks.misspelling_attacks(spec.concept, tok)
    assert len(found) >= 5
    words = [a.detail for a in found]
    token_ids = {tuple(tok(w, add_special_tokens=False).input_ids) for w in [*words, "smiley"]}
    assert len(token_ids) == len(words) + 1  # unlike the word and unlike each other
    target = next(s for s in spec.concept.eval_sets if s.role == "target")
    for attack in found:
        assert len(attack.prompts) == len(target.prompts)
        assert all(attack.detail in p and "smiley" not in p for p in attack.prompts), attack.name


def test_a_ball_around_the_target_states_that_holds_its_misspellings_holds_a_kept_face(toy):
    """Why a text-side adversary cannot carry over to the held-out misspellings (docs/attacks.md): in the
    text encoder's output, the attack's misspellings lie as far from the target prompt's states as the
    faces that must be kept. Measured at the end-of-text position, relative to the state's norm, mean
    over the target set's prompts."""
    pipe, _ = toy
    spec = _spec()
    prompts = next(s for s in spec.concept.eval_sets if s.role == "target").prompts

    def states(words):
        ids = text_to_image.tokenize(pipe, [p.replace("smiley", w) for w in words for p in prompts])
        eos = np.argmax(ids == pipe.tokenizer.eos_token_id, axis=1)
        out = np.asarray(pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids).last_hidden_state)
        return out[np.arange(len(ids)), eos].reshape(len(words), len(prompts), -1)

    target = states(["smiley"])[0]

    def distance(word):
        return float(np.mean(np.linalg.norm(states([word])[0] - target, axis=-1) / np.linalg.norm(target, axis=-1)))

    misspelled = [distance(a.detail) for a in attacks.misspelling_attacks(spec.concept, pipe.tokenizer)]
    kept = [distance(w) for w in spec.concept.preserve]
    assert min(kept) <= max(misspelled), (kept, misspelled)
    assert distance(spec.concept.anchor) > max(misspelled)  # the anchor is farther than either


def test_unknown_attacks_and_bad_budgets_are_refused():
    with pytest.raises(ConfigError, match="eval.attacks names 'jailbreak'"):
        _spec(**{"eval.attacks": "misspelling;jailbreak"})
    with pytest.raises(ConfigError, match="attack.search_steps must be a positive integer"):
        _spec(**{"attack.search_steps": 0})
    assert config_lib.attack_kinds("all") == config_lib.ATTACKS
    assert config_lib.attack_kinds(" search ; embedding;search") == ("search", "embedding")


def test_the_embedding_attack_moves_one_row_of_the_token_embedding_only(toy):
    pipe, _ = toy
    # The base report's image count and mesh, so that both compile the same programs.
    spec = _spec(**{"attack.embedding_steps": 3})
    images = attacks.target_images(spec, pipe, sharding.make_mesh())
    attack = attacks.embedding_attack(spec, pipe, pipe.params, images)
    token = attack.detail.split("'")[1]
    named = re.compile(rf"\b{token}\b")
    assert all(named.search(p) for p in attack.prompts)
    assert not any(named.search(p) for s in spec.concept.eval_sets for p in s.prompts)
    before, after = params_lib.flatten(pipe.params), params_lib.flatten(attack.params)
    changed = [k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))]
    assert changed == ["text_encoder/text_model/embeddings/token_embedding/embedding"]
    (row,) = pipe.tokenizer(token, add_special_tokens=False).input_ids
    diff = np.any(np.asarray(before[changed[0]]) != np.asarray(after[changed[0]]), axis=1)
    assert np.flatnonzero(diff).tolist() == [row]


@pytest.fixture(scope="module")
def base_report(toy, tmp_path_factory):
    pipe, clip = toy
    spec = _spec(**{"eval.attacks": "all"})
    workdir = tmp_path_factory.mktemp("attacks")
    report = evaluate.evaluate_run(spec, workdir, base_only=True, pipeline=pipe, clip=clip,
                                   mesh=sharding.make_mesh(), progress=False)
    return report, workdir


def test_every_attack_reaches_the_target_on_the_base_model(base_report):
    found = base_report[0]["attacks"]
    assert {a["kind"] for a in found.values()} == {*config_lib.ATTACKS, "control"}
    # Read among the target, the anchor and five neighbours (three of them faces), half or more of
    # each attack's images are smileys; a learned attack that learned nothing would draw circles.
    for name in ("paraphrase_smiley_paraphrase", "embedding", "search"):
        assert found[name]["success_rate"]["base"] >= 0.5, (name, found[name])
        assert found[name]["success_rate"]["ablated"] is None
    assert sum(a["kind"] == "misspelling" for a in found.values()) >= 5


def test_the_best_misspelling_is_drawn_again_on_seeds_of_its_own(base_report):
    report, workdir = base_report
    found = report["attacks"]
    best = found[attacks.BEST_MISSPELLING]
    variants = {name: a for name, a in found.items() if a["kind"] == "misspelling" and name != attacks.BEST_MISSPELLING}
    top = max(variants, key=lambda v: variants[v]["success_rate"]["base"])
    assert best["kind"] == "misspelling" and best["n_images"] == variants[top]["n_images"]
    assert best["prompt"] == variants[top]["prompt"]
    rate = variants[top]["success_rate"]["base"]
    assert best["detail"]["base"] == f"{variants[top]['detail']['base']} ({top}: {rate:.2f} on the variants' draws)"
    # The same prompts on seeds of its own: other images than those the variant was chosen on.
    eval_dir = workdir / "eval"
    assert (eval_dir / f"attack_{attacks.BEST_MISSPELLING}.png").read_bytes() != (eval_dir / f"attack_{top}.png").read_bytes()


def test_the_best_misspelling_is_the_first_of_the_highest():
    a, b, c = (attacks.Attack(f"misspelling_{k}", "misspelling", (f"a red {w}",), detail=w)
               for k, w in (("doubled", "smilley"), ("dropped", "smiey"), ("swapped", "smiely")))
    best = attacks.best_misspelling([(a, 0.25), (b, 0.40), (c, 0.40)])
    assert best == attacks.Attack(attacks.BEST_MISSPELLING, "misspelling", ("a red smiey",),
                                  detail="smiey (misspelling_dropped: 0.40 on the variants' draws)")
    with pytest.raises(attacks.AttackError, match="no misspelling"):
        attacks.best_misspelling([])


def test_the_search_control_draws_its_prefix_without_the_target_name(base_report):
    found = base_report[0]["attacks"]
    search, control = found["search"], found["search_without_target"]
    assert control["kind"] == "control" and control["detail"] == search["detail"]
    prefix = search["detail"]["base"].split("'")[1]
    assert control["prompt"].startswith(prefix.replace("smiley", "circle") + " ")
    assert not re.search(r"\bsmiley\b", control["prompt"]) and re.search(r"\bcircle\b", control["prompt"])
    # Naming a circle instead, the prefix the search found on the base model draws far fewer smileys.
    assert control["success_rate"]["base"] <= search["success_rate"]["base"] - 0.3, (control, search)


def test_the_control_replaces_every_name_of_the_target():
    concept = dataclasses.replace(_spec().concept, aliases=("happy face", "smiling face"))
    search = attacks.Attack("search", "search", ("wink smiley a red smiley", "a happy face and a Smiley"))
    control = attacks.without_target(search, concept)
    assert control.prompts == ("wink circle a red circle", "a circle and a circle")
    assert control.name == "search_without_target" and control.kind == "control"
    # Both models draw the prefix found against the ablated one.
    found = {"base": attacks.Attack("search", "search", ("happy smiley a red smiley",)), "ablated": search}
    assert attacks.search_controls(found, concept) == {"base": control, "ablated": control}
    assert attacks.search_controls({"base": search}, concept) == {"base": control}


def test_attacks_are_in_the_report_its_tables_and_grids(base_report):
    base_report, workdir = base_report
    check_report(base_report)
    table, markdown = format_table(base_report), format_markdown(base_report)
    for name in base_report["attacks"]:
        assert name in table and f"attack_{name}.png" in markdown
        assert (workdir / "eval" / f"attack_{name}.png").is_file()
    broken = copy.deepcopy(base_report)
    broken["attacks"]["search"]["kind"] = "jailbreak"
    with pytest.raises(ValueError, match="attacks.search.kind must be one of"):
        check_report(broken)
    broken = copy.deepcopy(base_report)
    broken["attacks"]["embedding"]["success_rate"]["base"] = 1.5
    with pytest.raises(ValueError, match=r"attacks.embedding.success_rate.base must lie in \[0, 1\]"):
        check_report(broken)
