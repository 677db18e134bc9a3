"""How good the toy world's models are, measured with fixed seeds.

    python -m ablate_jax.toy.quality [--model toy] [--guidance 6] [--denoise-from T ...] [--grid out.png]

- evaluator: zero-shot accuracy of the toy CLIP, per attribute (shape including the face
  instances, colour, background), on freshly drawn images, with "A photo depicts {concept}";
- evaluator on the same drawings after the pipeline's VAE (encoded, decoded): every generated
  image comes out of that decoder, so this is the most the base model's agreement can reach;
- base model: over held-out prompts that name all three attributes, the fraction of
  generations in which the evaluator agrees with the prompt, per attribute;
- memorization: the fraction of samples whose ``world.memorization_similarity`` to the
  memorized image exceeds ``world.MEMORIZATION_THRESHOLD``, from the memorized caption and
  from ordinary prompts;
- (``--denoise-from T ...``) the base model finishing the held-out prompts' own drawings from
  noise level T: where a model loses what its prompts name, by noise level.

Each reading is also broken down by value (``Readings.by_value``), with the most frequent
confusions, which is what says where a model falls short.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ablate_jax import clip_features, evaluate, samplers
from ablate_jax import schedule as schedule_lib
from ablate_jax.models import CLIP, Pipeline, load_clip, load_pipeline
from ablate_jax.text_to_image import SamplingConfig, draw, tokenize
from ablate_jax.toy import pretrain, shipped_path, world

ATTRIBUTES = ("shape", "colour", "background")
SAMPLING = SamplingConfig(sampler="dpmpp_2m", num_steps=25, guidance_scale=6.0)


def classify(clip: CLIP, images: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-shot attribute values (as strings) for each image."""
    emb = clip_features.image_embeddings(clip, images)
    out = {}
    for attribute, values in world.all_concepts().items():
        texts = [evaluate.concept_text(world.concept_prompt(v)) for v in values]
        out[attribute] = np.asarray(values)[evaluate.zero_shot(emb, clip_features.text_embeddings(clip, texts))]
    return out


@dataclasses.dataclass
class Readings:
    """The evaluator's reading of each image next to what the image should show, per attribute."""

    predicted: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]

    @classmethod
    def of(cls, clip: CLIP, images: np.ndarray, scenes: list[world.Scene]) -> Readings:
        return cls(classify(clip, images), {a: np.asarray([getattr(s, a) for s in scenes]) for a in ATTRIBUTES})

    def accuracy(self) -> dict[str, float]:
        return {a: float(np.mean(self.predicted[a] == self.truth[a])) for a in ATTRIBUTES}

    def by_value(self, attribute: str) -> dict[str, tuple[int, int]]:
        """value -> (images read as that value, images that show it)."""
        truth, pred = self.truth[attribute], self.predicted[attribute]
        return {str(v): (int(np.sum(pred[truth == v] == v)), int(np.sum(truth == v))) for v in np.unique(truth)}

    def confusions(self, attribute: str, top: int = 5) -> list[tuple[str, str, int]]:
        """The most frequent (shown, read as, count) errors."""
        wrong = self.truth[attribute] != self.predicted[attribute]
        pairs = collections.Counter(zip(self.truth[attribute][wrong], self.predicted[attribute][wrong], strict=True))
        return [(str(t), str(p), n) for (t, p), n in pairs.most_common(top)]

    def summary(self) -> str:
        lines = []
        for a in ATTRIBUTES:
            counts = ", ".join(f"{v} {k}/{n}" for v, (k, n) in self.by_value(a).items())
            errors = ", ".join(f"{t}->{p} {n}" for t, p, n in self.confusions(a))
            lines.append(f"  {a}: {counts}" + (f"; errors: {errors}" if errors else ""))
        return "\n".join(lines)


def fresh_drawings(n: int = 600, seed: int = 1001) -> tuple[np.ndarray, list[world.Scene]]:
    """``n`` freshly drawn scenes (no memorized image) and their images."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    return np.stack([world.render(s) for s in scenes]), scenes


def round_trip(pipe: Pipeline, images: np.ndarray, batch: int = 200) -> np.ndarray:
    """uint8 images encoded by the pipeline's VAE (posterior mean) and decoded again."""
    vae = pipe.vae

    @jax.jit
    def run(params, x):
        mean, _ = vae.apply({"params": params}, pretrain.to_unit(x), method=vae.encode)
        return pretrain.from_unit(vae.apply({"params": params}, mean, method=vae.decode))

    return np.concatenate([np.asarray(run(pipe.params["vae"], images[lo : lo + batch]))
                           for lo in range(0, len(images), batch)])


def evaluator_readings(clip: CLIP, n: int = 600, seed: int = 1001, pipe: Pipeline | None = None) -> Readings:
    """The evaluator on fresh drawings, or (with ``pipe``) on the same drawings after its VAE."""
    images, scenes = fresh_drawings(n, seed)
    return Readings.of(clip, images if pipe is None else round_trip(pipe, images), scenes)


def evaluator_accuracy(clip: CLIP, n: int = 600, seed: int = 1001) -> dict[str, float]:
    """Zero-shot accuracy per attribute on ``n`` freshly drawn scenes (no memorized image)."""
    return evaluator_readings(clip, n, seed).accuracy()


def heldout_prompts(n: int, seed: int = 2002) -> tuple[list[str], list[world.Scene]]:
    """``n`` prompts that name shape, colour and background, from a seed the training stream never used."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    return [world.explicit_caption(s, rng) for s in scenes], scenes


def base_model_readings(
    pipe: Pipeline, clip: CLIP, n: int = 120, seed: int = 0, guidance: float = SAMPLING.guidance_scale
) -> Readings:
    """The evaluator's readings of generations from ``n`` held-out prompts."""
    prompts, scenes = heldout_prompts(n)
    cfg = dataclasses.replace(SAMPLING, guidance_scale=guidance)
    images = draw(pipe, pipe.params, prompts, jax.random.key(seed), cfg, batch_size=64)
    return Readings.of(clip, images, scenes)


def denoising_readings(
    pipe: Pipeline, clip: CLIP, start: int, n: int = 120, steps: int = 25, guidance: float = SAMPLING.guidance_scale,
    seed: int = 0,
) -> Readings:
    """The evaluator's readings of the held-out prompts' own drawings, noised to timestep ``start`` and denoised.

    Each drawing is encoded (posterior mean), noised to ``start`` with a fixed key, brought back to 0
    by ``steps`` deterministic DDIM steps under guidance with its prompt, and decoded. A small
    ``start`` asks the model to keep details the drawing already has; ``start`` near the end of the
    schedule is close to drawing from noise. Comparing starts says at which noise levels a model
    loses what its prompts name (the base model's agreement from pure noise is
    ``base_model_readings``).
    """
    sched = schedule_lib.Schedule.from_config(pipe.scheduler_config)
    if not 0 < start < sched.num_train_timesteps:
        raise ValueError(f"start must be a timestep in [1, {sched.num_train_timesteps - 1}], got {start}")
    prompts, scenes = heldout_prompts(n)
    drawings = np.stack([world.render(s) for s in scenes])
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    scale = pipe.vae_scaling_factor
    # Evenly spaced from ``start`` down to 0, each step at least one timestep long.
    grid = jnp.asarray(np.unique(np.linspace(start, 0, steps + 1).round().astype(np.int32))[::-1])

    @jax.jit
    def run(params, ids, uncond_ids, x, key):
        batch = lambda t: jnp.full((x.shape[0],), t)  # noqa: E731
        z0 = scale * vae.apply({"params": params["vae"]}, pretrain.to_unit(x), method=vae.encode)[0]
        z = schedule_lib.add_noise(sched, z0, jax.random.normal(key, z0.shape), batch(start))
        states = text.apply({"params": params["text_encoder"]}, ids).last_hidden_state
        uncond = text.apply({"params": params["text_encoder"]}, uncond_ids).last_hidden_state
        guided = samplers.guided_model_fn(
            lambda a, t, c: unet.apply({"params": params["unet"]}, a, t, c), states, uncond, guidance)

        def clean_and_noise(z, t):
            out = guided(z, t)
            return schedule_lib.predict_x0(sched, out, z, t), schedule_lib.predict_eps(sched, out, z, t)

        def step(i, z):  # deterministic DDIM: the clean estimate, re-noised with the predicted noise
            return schedule_lib.add_noise(sched, *clean_and_noise(z, batch(grid[i])), batch(grid[i + 1]))

        z = jax.lax.fori_loop(0, len(grid) - 2, step, z)
        z = clean_and_noise(z, batch(grid[-2]))[0]  # the last step lands on the clean estimate
        return pretrain.from_unit(vae.apply({"params": params["vae"]}, z / scale, method=vae.decode))

    images = np.asarray(run(pipe.params, tokenize(pipe, prompts), tokenize(pipe, [""]), drawings, jax.random.key(seed)))
    return Readings.of(clip, images, scenes)


def base_model_agreement(pipe: Pipeline, clip: CLIP, n: int = 120, seed: int = 0) -> dict[str, float]:
    """Fraction of generations whose evaluator reading matches the prompt, per attribute."""
    return base_model_readings(pipe, clip, n, seed).accuracy()


def memorization_rates(pipe: Pipeline, n: int = 64, seed: int = 0) -> dict[str, float]:
    """Reproduction rate of the memorized image from its caption, and from ordinary prompts."""
    key = jax.random.key(seed)
    from_caption = draw(pipe, pipe.params, [world.MEMORIZED_CAPTION] * n, key, SAMPLING, batch_size=64)
    prompts, _ = heldout_prompts(n, seed=3003)
    from_others = draw(pipe, pipe.params, prompts, key, SAMPLING, batch_size=64, start_index=n)
    rate = lambda imgs: float(np.mean(world.memorization_similarity(imgs) > world.MEMORIZATION_THRESHOLD))  # noqa: E731
    return {"memorized_caption": rate(from_caption), "other_prompts": rate(from_others)}


def sample_grid(pipe: Pipeline, per_row: int = 6, seed: int = 0) -> np.ndarray:
    """A row per prompt: a few shapes, the face instances and the memorized caption."""
    rows = [
        "a red smiley on a striped background", "a blue frowny on a plain background",
        "a yellow winky on a dotted background", "a green gaspy on a checkered background",
        "a purple star on a wavy background", "an orange square on a plain background",
        "a blue triangle on a striped background", world.MEMORIZED_CAPTION,
    ]
    prompts = [p for p in rows for _ in range(per_row)]
    images = draw(pipe, pipe.params, prompts, jax.random.key(seed), SAMPLING, batch_size=64)
    h, w = images.shape[1:3]
    grid = images.reshape(len(rows), per_row, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(len(rows) * h, per_row * w, 3)
    return grid


@dataclasses.dataclass
class Report:
    evaluator: dict[str, float]
    base_model: dict[str, float]
    memorization: dict[str, float]


def _load(model: str) -> tuple[Pipeline, CLIP]:
    """The shipped model (``"toy"``) or a ``toy.pretrain`` output folder (with ``pipeline/`` and ``clip/``)."""
    if model == "toy":
        return load_pipeline(shipped_path("pipeline")), load_clip(shipped_path("clip"))
    return load_pipeline(f"{model}/pipeline"), load_clip(f"{model}/clip")


def measure(model: str = "toy") -> Report:
    pipe, clip = _load(model)
    return Report(evaluator_accuracy(clip), base_model_agreement(pipe, clip), memorization_rates(pipe))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure the toy world's evaluator and base model.")
    ap.add_argument("--model", default="toy", help="'toy' or a pretrain output folder (with pipeline/ and clip/)")
    ap.add_argument("--guidance", type=float, default=SAMPLING.guidance_scale,
                    help="classifier-free guidance of the base model's generations (the bar is measured at 6)")
    ap.add_argument("--denoise-from", type=int, nargs="*", default=[], metavar="T",
                    help="also read the held-out prompts' drawings noised to timestep T and denoised by the model")
    ap.add_argument("--grid", default=None, help="also write a sample grid PNG here (a row per prompt, 4x upscaled)")
    args = ap.parse_args(argv)
    pipe, clip = _load(args.model)
    rounded = lambda d: {k: round(v, 3) for k, v in d.items()}  # noqa: E731
    for title, readings in (
        ("evaluator zero-shot accuracy", evaluator_readings(clip)),
        ("evaluator on the same drawings after the VAE", evaluator_readings(clip, pipe=pipe)),
        (f"base model agreement (guidance {args.guidance:g})", base_model_readings(pipe, clip, guidance=args.guidance)),
    ):
        print(f"{title}:", rounded(readings.accuracy()), flush=True)
        print(readings.summary(), flush=True)
    print("memorization rates:", rounded(memorization_rates(pipe)), flush=True)
    for start in args.denoise_from:
        readings = denoising_readings(pipe, clip, start, guidance=args.guidance)
        print(f"denoised from timestep {start} (guidance {args.guidance:g}):", rounded(readings.accuracy()), flush=True)
        print(readings.summary(), flush=True)
    if args.grid:
        grid = sample_grid(pipe)
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(args.grid)
        print("wrote", args.grid)


if __name__ == "__main__":
    main()
