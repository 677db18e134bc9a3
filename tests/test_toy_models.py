"""The toy world's models: a pretraining smoke run, and the shipped weights in JAX and in PyTorch."""

import multiprocessing
import os
import signal
import time

import jax
import numpy as np
import pytest
import torch

from ablate_jax import toy
from ablate_jax.models import load_clip, load_pipeline
from ablate_jax.toy import pretrain, quality, shipped_path, world


@pytest.mark.slow  # 2 minutes, nearly all of it compiling four training programs, twice
def test_pretraining_smoke_run_lowers_every_loss(tmp_path):
    result = pretrain.pretrain(tmp_path, pretrain.BUDGETS["smoke"], seed=0)
    for stage in ("clip", "vae", "unet", "evaluator"):
        losses = result["losses"][stage]
        assert len(losses) == pretrain.BUDGETS["smoke"].clip_steps
        assert losses[-1] < losses[0], (stage, losses)
    pipe = load_pipeline(tmp_path / "pipeline")
    clip = load_clip(tmp_path / "clip")
    assert pipe.sample_size == pretrain.LATENT_SIZE and clip.image_size == pretrain.IMAGE_SIZE
    # Both folders are marked, so that model=DIR/pipeline runs with the toy world's settings.
    assert toy.is_toy_world(str(tmp_path / "pipeline")) and toy.is_toy_world(str(tmp_path / "clip"))
    # The evaluator's text tower is the pipeline's text encoder; only its vision side trained on.
    joint = load_clip(tmp_path / "clip-joint")
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))  # noqa: E731
    assert same(pipe.params["text_encoder"]["text_model"], clip.params["text_model"])
    assert same(joint.params["text_projection"], clip.params["text_projection"])
    assert not same(joint.params["vision_model"], clip.params["vision_model"])

    # On a CPU the CLIP trained in a second process beside the VAE, and the evaluator beside the
    # UNet; one process, one stage after another, gives the same bytes.
    assert set(result["beside"]) == {"clip", "evaluator"}
    assert "clip: loss" in (tmp_path / "clip.log").read_text()
    assert "evaluator: loss" in (tmp_path / "evaluator.log").read_text()
    alone = pretrain.pretrain(tmp_path / "one-process", pretrain.BUDGETS["smoke"], seed=0, beside=False)
    assert alone["beside"] == {} and alone["losses"] == result["losses"]
    for weights in ("clip-joint/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "pipeline/unet/diffusion_pytorch_model.safetensors", "clip/model.safetensors"):
        assert (tmp_path / "one-process" / weights).read_bytes() == (tmp_path / weights).read_bytes(), weights


# Targets of the second-process tests: module-level, so that a spawned interpreter can import them.
def _count_to(n, on_step):
    for i in range(1, n + 1):
        on_step(i)
    print(f"counted to {n}")
    return {"n": n, "devices": jax.local_device_count()}


def _fail(on_step):
    on_step(1)
    raise ValueError("the stage broke")


def _vanish(on_step):
    os._exit(3)


def _sleep(on_step):
    time.sleep(120)


def test_a_second_process_reports_its_result_its_failure_or_its_death(tmp_path):
    jobs = {name: pretrain.BesideJob(name, target, args, 5, tmp_path / f"{name}.log") for name, target, args in [
        ("count", _count_to, (5,)), ("fail", _fail, ()), ("vanish", _vanish, ()), ("sleep", _sleep, ())]}
    try:
        result, seconds = jobs["count"].wait()
        # Its output goes to its log, and it gets this process's CPU device count.
        assert result == {"n": 5, "devices": jax.local_device_count()} and seconds > 0
        assert "counted to 5" in (tmp_path / "count.log").read_text()
        with pytest.raises(RuntimeError, match=r"(?s)fail failed in its process.*ValueError: the stage broke"):
            jobs["fail"].wait()
        with pytest.raises(RuntimeError, match="vanish: its process ended with exit code 3 and no result"):
            jobs["vanish"].wait()
        # A failed or interrupted run ends the job it started.
        jobs["sleep"].stop()
        assert jobs["sleep"]._process.exitcode == -signal.SIGTERM
    finally:
        for job in jobs.values():
            job.stop()


def test_a_failed_pretraining_ends_its_second_process(tmp_path, monkeypatch, capsys):
    def broken_vae(*args, **kwargs):
        raise RuntimeError("the VAE broke")

    monkeypatch.setattr(pretrain, "_vae_stage", broken_vae)
    with pytest.raises(RuntimeError, match="the VAE broke"):
        pretrain.pretrain(tmp_path, pretrain.BUDGETS["smoke"], seed=0)
    # The CLIP was training in a second process when the VAE failed; it is stopped, not left behind.
    assert "clip: training in a second process" in capsys.readouterr().out
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "clip-joint" / toy.MARKER).exists()


def test_pretraining_steps_do_not_depend_on_the_device_count():
    # Each batch is split over the devices; the random draws inside the loss must not follow the split.
    from ablate_jax import sharding

    def loss_fn(params, batch, key):
        noise = jax.random.normal(key, (batch["x"].shape[0], 3))
        return ((batch["x"] @ params["w"] + noise) ** 2).mean()

    def batches(i):
        return {"x": np.random.default_rng(i).standard_normal((16, 4)).astype(np.float32)}

    start = {"w": np.ones((4, 3), np.float32)}
    fit = lambda devices: pretrain._fit("t", loss_fn, start, batches, 5, 1e-2, jax.random.key(0),  # noqa: E731
                                        mesh=sharding.make_mesh(devices))
    one, eight = fit(jax.devices()[:1]), fit(jax.devices())
    assert not np.allclose(one["w"], start["w"])
    np.testing.assert_allclose(eight["w"], one["w"], rtol=1e-5, atol=1e-6)


def test_pretraining_refuses_a_device_count_below_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--out", str(tmp_path / "out"), "--cpu-devices", "0"])
    assert exit_info.value.code == 2
    assert "--cpu-devices must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shipped_model_is_the_default_and_small():
    size = sum(f.stat().st_size for f in toy.ASSETS.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, size
    pipe = load_pipeline(shipped_path("pipeline"))
    assert pipe.tokenizer.model_max_length == 20


def test_shipped_model_loads_in_pytorch_and_matches():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    pipe = load_pipeline(shipped_path("pipeline"))
    ref = StableDiffusionPipeline.from_pretrained(toy.shipped_path("pipeline"), safety_checker=None)
    ids = pipe.tokenizer(["a red smiley on a striped background"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="np").input_ids
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    with jax.default_matmul_precision("highest"), torch.no_grad():
        states = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids).last_hidden_state
        eps = pipe.unet.apply({"params": pipe.params["unet"]}, x, np.array([500]), states)
        ref_states = ref.text_encoder(torch.from_numpy(ids).long())[0]
        ref_eps = ref.unet(torch.from_numpy(x).permute(0, 3, 1, 2), 500, ref_states).sample.permute(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(eps), ref_eps.numpy(), rtol=1e-4, atol=1e-5)

    clip = load_clip(shipped_path("clip"))
    ref_clip = CLIPModel.from_pretrained(toy.shipped_path("clip"))
    img = world.render(world.sample_scene(np.random.default_rng(0)))[None]
    pixels = ((img / 255.0 - 0.5) / 0.5).astype(np.float32)
    with jax.default_matmul_precision("highest"), torch.no_grad():
        ours = clip.model.apply({"params": clip.params}, pixels, method=clip.model.get_image_features)
        theirs = ref_clip.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    theirs = getattr(theirs, "pooler_output", theirs)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def shipped():
    return load_pipeline(shipped_path("pipeline")), load_clip(shipped_path("clip"))


def test_base_model_memorized_one_image(shipped):
    pipe, _ = shipped
    rates = quality.memorization_rates(pipe, n=64)
    assert rates["memorized_caption"] >= 0.80 and rates["other_prompts"] <= 0.05, rates


def test_evaluator_reads_every_attribute_of_fresh_drawings(shipped):
    _, clip = shipped
    accuracy = quality.evaluator_accuracy(clip, n=600)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_base_model_draws_what_its_prompts_name(shipped):
    pipe, clip = shipped
    agreement = quality.base_model_agreement(pipe, clip, n=120)
    assert min(agreement.values()) >= 0.85, agreement


def test_readings_break_accuracy_down_by_value_and_confusion():
    truth = {a: np.asarray(["x", "x", "y", "y"]) for a in quality.ATTRIBUTES}
    predicted = {a: np.asarray(["x", "y", "y", "x"]) for a in quality.ATTRIBUTES}
    predicted["shape"] = np.asarray(["y", "y", "y", "y"])
    readings = quality.Readings(predicted, truth)
    assert readings.accuracy() == {"shape": 0.5, "colour": 0.5, "background": 0.5}
    assert readings.by_value("shape") == {"x": (0, 2), "y": (2, 2)}
    assert readings.confusions("shape") == [("x", "y", 2)]
    assert readings.confusions("colour") == [("x", "y", 1), ("y", "x", 1)]
    assert "shape: x 0/2, y 2/2; errors: x->y 2" in readings.summary()


def test_vae_round_trips_stay_close_to_the_drawings(shipped):
    pipe, clip = shipped
    images, scenes = quality.fresh_drawings(n=40)
    trips = quality.round_trip(pipe, images)
    assert trips.dtype == np.uint8 and trips.shape == images.shape
    # The shipped VAE is off by 7.4 grey levels on average over 600 drawings.
    assert np.abs(trips.astype(np.float32) - images).mean() < 12
    readings = quality.evaluator_readings(clip, n=40, pipe=pipe)
    assert sum(n for _, n in readings.by_value("shape").values()) == 40
    assert readings.accuracy()["colour"] >= 0.95


def test_denoising_from_a_low_noise_level_keeps_the_drawing(shipped):
    pipe, clip = shipped
    with pytest.raises(ValueError, match="start must be a timestep"):
        quality.denoising_readings(pipe, clip, 0, n=8)
    with pytest.raises(ValueError, match="start must be a timestep"):
        quality.denoising_readings(pipe, clip, 1000, n=8)
    # From timestep 1 the model's one step lands on its clean prediction of the drawing itself, so the
    # readings are those of the round trips; from pure noise they are generations again, which
    # agree with the prompts less (background: 0.95 from timestep 50, 0.78 from 999 on 120 prompts).
    _, scenes = quality.heldout_prompts(24)
    drawings = np.stack([world.render(s) for s in scenes])
    trips = quality.Readings.of(clip, quality.round_trip(pipe, drawings), scenes)
    near = quality.denoising_readings(pipe, clip, 1, n=24)
    far = quality.denoising_readings(pipe, clip, 999, n=24)
    for a in quality.ATTRIBUTES:
        assert np.mean(near.predicted[a] == trips.predicted[a]) >= 0.95, a
    assert near.accuracy()["background"] > far.accuracy()["background"]
