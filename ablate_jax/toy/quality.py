"""How good the toy world's models are, measured with fixed seeds.

    python -m ablate_jax.toy.quality [--model toy] [--grid out.png]

- evaluator: zero-shot accuracy of the toy CLIP, per attribute (shape including the face
  instances, colour, background), on freshly drawn images, with "A photo depicts {concept}";
- base model: over held-out prompts that name all three attributes, the fraction of
  generations in which the evaluator agrees with the prompt, per attribute;
- memorization: the fraction of samples whose ``world.memorization_similarity`` to the
  memorized image exceeds ``world.MEMORIZATION_THRESHOLD``, from the memorized caption and
  from ordinary prompts.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np
from PIL import Image

from ablate_jax import evaluate
from ablate_jax.models import CLIP, Pipeline, load_clip, load_pipeline
from ablate_jax.sampling import SamplingConfig, generate
from ablate_jax.toy import world

ATTRIBUTES = ("shape", "colour", "background")
SAMPLING = SamplingConfig(sampler="dpmpp_2m", num_steps=25, guidance_scale=6.0)


def classify(clip: CLIP, images: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-shot attribute values (as strings) for each image."""
    emb = evaluate.image_embeddings(clip, images)
    out = {}
    for attribute, values in world.all_concepts().items():
        texts = [evaluate.concept_text(world.concept_prompt(v)) for v in values]
        out[attribute] = np.asarray(values)[evaluate.zero_shot(emb, evaluate.text_embeddings(clip, texts))]
    return out


def evaluator_accuracy(clip: CLIP, n: int = 600, seed: int = 1001) -> dict[str, float]:
    """Zero-shot accuracy per attribute on ``n`` freshly drawn scenes (no memorized image)."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    images = np.stack([world.render(s) for s in scenes])
    pred = classify(clip, images)
    return {a: float(np.mean(pred[a] == np.asarray([getattr(s, a) for s in scenes]))) for a in ATTRIBUTES}


def heldout_prompts(n: int, seed: int = 2002) -> tuple[list[str], list[world.Scene]]:
    """``n`` prompts that name shape, colour and background, from a seed the training stream never used."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    return [world.explicit_caption(s, rng) for s in scenes], scenes


def base_model_agreement(pipe: Pipeline, clip: CLIP, n: int = 120, seed: int = 0) -> dict[str, float]:
    """Fraction of generations whose evaluator reading matches the prompt, per attribute."""
    prompts, scenes = heldout_prompts(n)
    images = generate(pipe, pipe.params, prompts, jax.random.key(seed), SAMPLING, batch_size=64)
    pred = classify(clip, images)
    return {a: float(np.mean(pred[a] == np.asarray([getattr(s, a) for s in scenes]))) for a in ATTRIBUTES}


def memorization_rates(pipe: Pipeline, n: int = 64, seed: int = 0) -> dict[str, float]:
    """Reproduction rate of the memorized image from its caption, and from ordinary prompts."""
    key = jax.random.key(seed)
    from_caption = generate(pipe, pipe.params, [world.MEMORIZED_CAPTION] * n, key, SAMPLING, batch_size=64)
    prompts, _ = heldout_prompts(n, seed=3003)
    from_others = generate(pipe, pipe.params, prompts, key, SAMPLING, batch_size=64, start_index=n)
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
    images = generate(pipe, pipe.params, prompts, jax.random.key(seed), SAMPLING, batch_size=64)
    h, w = images.shape[1:3]
    grid = images.reshape(len(rows), per_row, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(len(rows) * h, per_row * w, 3)
    return grid


@dataclasses.dataclass
class Report:
    evaluator: dict[str, float]
    base_model: dict[str, float]
    memorization: dict[str, float]


def measure(model: str = "toy") -> Report:
    pipe, clip = load_pipeline(model), load_clip(model)
    return Report(evaluator_accuracy(clip), base_model_agreement(pipe, clip), memorization_rates(pipe))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure the toy world's evaluator and base model.")
    ap.add_argument("--model", default="toy", help="'toy' or a pretrain output folder (with pipeline/ and clip/)")
    ap.add_argument("--grid", default=None, help="also write a sample grid PNG here (a row per prompt, 4x upscaled)")
    args = ap.parse_args(argv)
    if args.model == "toy":
        pipe, clip = load_pipeline("toy"), load_clip("toy")
    else:
        pipe, clip = load_pipeline(f"{args.model}/pipeline"), load_clip(f"{args.model}/clip")
    print("evaluator zero-shot accuracy:", {k: round(v, 3) for k, v in evaluator_accuracy(clip).items()}, flush=True)
    print("base model agreement:", {k: round(v, 3) for k, v in base_model_agreement(pipe, clip).items()}, flush=True)
    print("memorization rates:", {k: round(v, 3) for k, v in memorization_rates(pipe).items()}, flush=True)
    if args.grid:
        grid = sample_grid(pipe)
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(args.grid)
        print("wrote", args.grid)


if __name__ == "__main__":
    main()
