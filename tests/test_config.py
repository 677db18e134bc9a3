"""Config resolution: every value that depends on the model family, the parameter group, the loss or
the concept is resolved in one place, the same whichever route sets the inputs, and an explicit
value always wins."""

import json
from pathlib import Path

import pytest

from ablate_jax import cli, families
from ablate_jax import config as config_lib
from ablate_jax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("xattn", "attn", "embedding", "full", "robust")
FILE_PARAMS = {"xattn": "xattn_kv", "attn": "attn", "embedding": "embedding", "full": "full", "robust": "attn"}

# What each family and group must resolve to, written out rather than read from the module.
SCHEDULE = {
    "toy": {"xattn_kv": (3e-4, 600), "xattn": (3e-4, 300), "attn": (3e-4, 300), "full": (1e-4, 50),
            "embedding": (1e-2, 300)},
    "sd": {"xattn_kv": (1.6e-5, 200), "xattn": (1.6e-5, 200), "attn": (1.6e-5, 200), "full": (2e-6, 400),
           "embedding": (1e-3, 200)},
}


def _sd_folder(root: Path, name: str, width: int) -> Path:
    """A folder that reads as a Stable Diffusion model of one family (resolution reads unet/config.json only)."""
    folder = root / name
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": width}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"toy": "toy", "sd1": str(_sd_folder(root, "sd1", 768)), "sd2": str(_sd_folder(root, "sd2", 1024))}


def _expected(family: str, file: str, params: str, loss: str) -> dict:
    toy = family == "toy"
    lr, steps = SCHEDULE["toy" if toy else "sd"][params]
    memorized = file == "full"  # configs/full.py's preset is the toy world's memorized image
    preserves = not memorized  # the smiley preset names frowny and winky; the memorized one nothing
    weight = ({"model_based": 4.0, "noise_based": 1.0}[loss]
              if toy and preserves and params in ("xattn_kv", "xattn", "attn") else 0.0)
    steps *= 2 if file == "robust" else 1  # configs/robust.py misspells a share of the target prompts
    return {"train.learning_rate": lr, "train.steps": steps, "anchors.num_images": 200 if toy else 1000,
            "prior_weight": 1.0 if params == "full" else 0.0, "preserve.weight": weight,
            "train.rescale": not memorized, "eval.clip": "toy" if toy else "openai/clip-vit-large-patch14"}


def _get(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _from_arg(file: str, pairs: list[tuple[str, str]]):
    module = _load(file)
    return module.get_config(",".join(f"{k}={v}" for k, v in pairs))


def _from_flags(file: str, arg_pairs: list[tuple[str, str]], flag_pairs: list[tuple[str, str]]):
    arg = ",".join(f"{k}={v}" for k, v in arg_pairs)
    argv = ["prog", f"--config={ROOT / 'configs' / (file + '.py')}" + (f":{arg}" if arg else ""), "--workdir=/unused"]
    argv += [f"--config.{k}={v}" for k, v in flag_pairs]
    fv = cli.flag_values(argv, "")
    config, _ = cli.parse(fv, argv, ValueError)
    return config


def _load(file: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{file}", ROOT / "configs" / f"{file}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("file", CONFIGS)
@pytest.mark.parametrize("family", ["toy", "sd1", "sd2"])
def test_every_route_resolves_the_same_values(file, family, models):
    params_choices = sorted({FILE_PARAMS[file], "xattn_kv", "full"})
    for params in params_choices:
        for loss in ("model_based", "noise_based"):
            inputs = [("model", models[family]), ("params", params), ("loss", loss)]
            routes = {
                "all in the arg": _from_arg(file, inputs),
                "all as flags": _from_flags(file, [], inputs),
                "model in the arg, the rest as flags": _from_flags(file, inputs[:1], inputs[1:]),
                "model as a flag, the rest in the arg": _from_flags(file, inputs[1:], inputs[:1]),
                "flags in reverse order": _from_flags(file, [], inputs[::-1]),
            }
            if params == FILE_PARAMS[file]:  # the file's own group, not restated
                routes["group from the file"] = _from_arg(file, [i for i in inputs if i[0] != "params"])
            expected = _expected(family, file, params, loss)
            for route, config in routes.items():
                resolved = config_lib.resolve(config)
                got = {k: _get(resolved, k) for k in expected}
                assert got == pytest.approx(expected), (file, family, params, loss, route)
                assert families.detect(resolved.model).name == family


@pytest.mark.parametrize("route", ["arg", "flag"])
def test_an_explicit_value_wins_over_the_resolved_one(route, models):
    explicit = [("model", models["sd1"]), ("params", "full"), ("train.learning_rate", "7e-6"), ("train.steps", "33"),
                ("prior_weight", "0.5"), ("anchors.num_images", "64"), ("eval.clip", "/data/clip"),
                ("train.rescale", "true"), ("train.encode_chunks", "2")]
    config = _from_arg("xattn", explicit) if route == "arg" else _from_flags("xattn", [], explicit)
    spec = config_lib.prepare(config)
    resolved, notes = spec.config, spec.notes
    assert (resolved.train.learning_rate, resolved.train.steps, resolved.prior_weight) == (7e-6, 33, 0.5)
    assert (resolved.anchors.num_images, resolved.eval.clip, resolved.train.rescale) == (64, "/data/clip", True)
    assert resolved.train.encode_chunks == 2
    # What was given is not reported as resolved; what was not is, with its rule.
    assert set(notes.values) == {"preserve.weight"}
    assert config.train.steps == 33 and config_lib.resolve(resolved) is resolved


def test_resolution_does_not_change_the_input_and_is_idempotent():
    config = _load("xattn").get_config()
    assert config.train.learning_rate is None and not config_lib.is_resolved(config)
    once = config_lib.resolve(config)
    assert config.train.learning_rate is None
    assert config_lib.resolve(once).to_dict() == once.to_dict()
    assert once.train.learning_rate == 3e-4 and once.is_locked


def test_a_real_model_scored_by_the_toy_evaluator_is_refused(models):
    config = _load("xattn").get_config(f"model={models['sd1']},eval.clip=toy")
    with pytest.raises(ConfigError, match=r"^eval.clip='toy' would score .* set --config.eval.clip"):
        config_lib.resolve(config)


def test_preservation_resolves_to_nothing_without_a_preservation_list_and_an_explicit_weight_is_refused():
    custom = ("concept.preset=,concept.kind=instance,concept.target=my character,concept.anchor=cat,"
              "concept.anchor_prompts=anchor_cat")
    spec = config_lib.prepare(_load("xattn").get_config(custom))
    resolved, notes = spec.config, spec.notes
    assert resolved.preserve.weight == 0.0 and "nothing to preserve" in notes.values["preserve.weight"][1]
    with pytest.raises(ConfigError, match="preserve.weight=2 but the concept names nothing to preserve"):
        config_lib.resolve(_load("xattn").get_config(custom + ",preserve.weight=2"))
    # An online teacher makes the term zero, so it resolves to none rather than failing.
    online = config_lib.resolve(_load("xattn").get_config("teacher=online"))
    assert online.preserve.weight == 0.0


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        ("train.steps=0", "train.steps must be a positive integer, got 0"),
        ("train.learning_rate=nan", "train.learning_rate must be a positive number, got nan"),
        ("train.learning_rate=inf", "train.learning_rate must be a positive number, got inf"),
        ("train.checkpoint_every=0", "train.checkpoint_every must be a positive integer"),
        ("train.log_every=0", "train.log_every must be a positive integer"),
        ("eval.num_images=1", "eval.num_images must be at least 2"),
        ("params=everything", "params must be one of"),
        ("loss=kl", "loss must be one of model_based, noise_based, got 'kl'"),
        ("teacher=online,preserve.weight=1", "preservation needs teacher='frozen'"),
        ("dtype=float16", "dtype must be one of float32, bfloat16"),
        ("train.remat=some", "train.remat must be one of none, attention, blocks"),
    ],
)
def test_values_out_of_range_are_refused_by_resolution(arg, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.resolve(_load("xattn").get_config(arg))


@pytest.mark.parametrize(
    ("flag", "match"),
    [
        ("--config.train.stepz=3", r"unknown config key 'train.stepz' \(from --config.train.stepz=3\)"),
        ("--config.nope.x=1", r"unknown config key 'nope.x'"),
        ("--config.train.steps=abc", r"config key 'train.steps' needs an integer, got 'abc'"),
        ("--config.train.flip=maybe", r"config key 'train.flip' needs true or false, got 'maybe'"),
    ],
)
def test_bad_flags_name_the_key(flag, match):
    argv = ["p", f"--config={ROOT / 'configs' / 'xattn.py'}", "--workdir=/x", flag]
    with pytest.raises(ValueError, match=match):
        cli.parse(cli.flag_values(argv, ""), argv, ValueError)


def test_the_arg_string_and_flags_take_lists_alike():
    by_arg = _from_arg("xattn", [("preserve.concepts", "frowny;winky")])
    by_flag = _from_flags("xattn", [], [("preserve.concepts", "frowny;winky")])
    by_literal = _from_flags("xattn", [], [("preserve.concepts", "('frowny', 'winky')")])
    assert by_arg.preserve.concepts == by_flag.preserve.concepts == by_literal.preserve.concepts == ("frowny", "winky")


def test_robust_settings_enter_the_training_identity_only_when_used():
    plain = config_lib.fingerprint(_load("xattn").get_config(), *config_lib.TRAIN_KEYS)
    assert "robust" not in plain["fields"]
    robust = config_lib.fingerprint(_load("robust").get_config(), *config_lib.TRAIN_KEYS)
    assert robust["fields"]["robust"]["adversarial"] is True and robust["hash"] != plain["hash"]
    misspelled = config_lib.fingerprint(_load("xattn").get_config("robust.misspell=0.25"), *config_lib.TRAIN_KEYS)
    assert misspelled["fields"]["robust"]["misspell"] == 0.25
    context = config_lib.fingerprint(_load("xattn").get_config("robust.context=0.25"), *config_lib.TRAIN_KEYS)
    assert context["fields"]["robust"]["context"] == 0.25 and context["hash"] != plain["hash"]
    assert "context" not in misspelled["fields"]["robust"]  # at 0, runs keep the identity they had without it
    # Words before every prompt take no example from the target: the steps stay the family's.
    assert config_lib.resolve(_load("xattn").get_config("robust.context=0.25")).train.steps == 600
    with pytest.raises(config_lib.ConfigError, match=r"robust.context must lie in \[0, 1\]"):
        config_lib.resolve(_load("xattn").get_config("robust.context=1.5"))


def test_a_run_recorded_before_or_with_a_neutral_setting_keeps_its_identity(tmp_path):
    from ablate_jax.workdir import WorkdirError, open_workdir  # noqa: PLC0415

    config = _load("robust").get_config()
    wd = open_workdir(config, tmp_path, ())
    wd.record_checkpoints()
    run_file = tmp_path / "checkpoints" / "run.json"
    record = json.loads(run_file.read_text())
    assert "paraphrase" not in record["fields"]["robust"]  # at its neutral value it is not recorded
    assert config_lib.fields_hash(record["fields"]) == record["hash"] == wd.train_identity["hash"]
    # A record that predates the setting, and one that holds it at its neutral value, are the same run.
    # (The stored hash of the second is the one such runs recorded: another than today's.)
    for extra in ({}, {"paraphrase": 0.0}):
        robust = {**record["fields"]["robust"], **extra}
        old = {**record, "fields": {**record["fields"], "robust": robust}, "hash": "0123456789abcdef"}
        run_file.write_text(json.dumps(old))
        assert open_workdir(config, tmp_path, ("train",)).train_identity["hash"] == record["hash"]
    # Away from the neutral value it is another run, and the refusal names the field.
    other = {**record, "fields": {**record["fields"], "robust": {**record["fields"]["robust"], "paraphrase": 0.25}}}
    run_file.write_text(json.dumps(other))
    with pytest.raises(WorkdirError, match="robust.paraphrase: 0.25 -> null"):
        open_workdir(config, tmp_path, ("train",))


def test_misspelled_or_paraphrased_target_prompts_double_the_resolved_steps():
    spec = config_lib.prepare(_load("xattn").get_config("robust.misspell=0.25"))
    assert spec.config.train.steps == 1200 and "x 2 with misspelled" in "\n".join(spec.notes.lines())
    assert config_lib.resolve(_load("xattn").get_config("robust.paraphrase=0.25")).train.steps == 1200
    with pytest.raises(config_lib.ConfigError, match="has none"):  # the memorized painting has no aliases
        config_lib.resolve(_load("xattn").get_config("concept=toy_memorized,robust.paraphrase=0.25"))
    assert config_lib.resolve(_load("xattn").get_config("robust.misspell=0.25,train.steps=100")).train.steps == 100
    several = config_lib.resolve(_load("xattn").get_config("concepts=toy_smiley;toy_striped,robust.misspell=0.5"))
    assert several.train.steps == 2400
    with pytest.raises(config_lib.ConfigError, match="none of the target's own prompts"):
        config_lib.resolve(_load("xattn").get_config("robust.misspell=1"))


def test_the_steps_factor_scales_the_family_steps_and_leaves_given_steps_alone():
    # attn on the toy world: 300 steps, x 2 with misspelled prompts, x 4.
    spec = config_lib.prepare(_load("robust").get_config("robust.misspell=0.5,train.steps_factor=4"))
    assert spec.config.train.steps == 2400 and "x 4 (train.steps_factor)" in "\n".join(spec.notes.lines())
    assert config_lib.resolve(_load("robust").get_config("train.steps_factor=4,train.steps=100")).train.steps == 100
    assert config_lib.resolve(_load("xattn").get_config("train.steps_factor=1.5")).train.steps == 900
    several = config_lib.resolve(_load("xattn").get_config("concepts=toy_smiley;toy_striped,train.steps_factor=2"))
    assert several.train.steps == 2400
    # Only the resolved steps are the run's identity: the factor that gave them is not.
    assert "train.steps_factor" not in config_lib.TRAIN_KEYS
    with pytest.raises(config_lib.ConfigError, match="train.steps_factor must be a positive number"):
        config_lib.resolve(_load("xattn").get_config("train.steps_factor=0"))

