"""Whether an image reproduces a memorized picture: the one measure anchors and evaluation both use.

A model family may bring its own copy detector (the toy world does: it knows its memorized
painting); otherwise the measure is CLIP image similarity. Anchor generation drops the images
that are copies; evaluation reports the fraction of samples of the memorized caption that are
copies, before and after ablation (docs/design.md, "Memorization").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ablate_jax import config as config_lib
from ablate_jax import storage, text_to_image
from ablate_jax.clip_features import image_embeddings
from ablate_jax.models.loading import CLIP, Pipeline

# Reference images of the memorized caption draw their noise from fold_in(key(seed), REFERENCE_STREAM),
# a stream of their own.
REFERENCE_STREAM = 0x6D656D6F  # "memo" in ASCII


class MemorizationError(ValueError):
    """The measure cannot be set up as configured; the message says why."""


@dataclasses.dataclass(frozen=True)
class MemorizationMeasure:
    """Decides which images still reproduce the memorized image: ``similarity(images) > threshold``."""

    name: str
    threshold: float
    similarity: Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float [N]
    references: np.ndarray | None = None  # the images compared with, where the measure draws them

    def memorized(self, images: np.ndarray) -> np.ndarray:
        """Boolean ``[N]``: True for images to drop."""
        return np.asarray(self.similarity(images)) > self.threshold


def anchor_measure_spec(spec: config_lib.Spec) -> dict[str, Any]:
    """What decides which anchor images are dropped, as recorded with the anchor set."""
    own = spec.family.copy_detector
    if own is not None:
        detector = own()
        return {"measure": detector.name, "threshold": detector.threshold}
    a = spec.config.anchors
    return {"measure": "clip", "clip": spec.config.eval.clip, "threshold": a.memorization_threshold,
            "references": a.memorization_references}


def anchor_measure(spec: config_lib.Spec, pipeline: Pipeline, mesh: jax.sharding.Mesh, load_clip: Callable[[], CLIP],
                   ) -> MemorizationMeasure:
    """The family's own copy detector, or the max CLIP image cosine to images the base model draws
    from the memorized caption (:func:`clip_reference_measure`)."""
    own = spec.family.copy_detector
    if own is not None:
        detector = own()
        return MemorizationMeasure(detector.name, detector.threshold, detector.similarity)
    return clip_reference_measure(spec, pipeline, mesh, load_clip())


def clip_reference_measure(spec: config_lib.Spec, pipeline: Pipeline, mesh: jax.sharding.Mesh, clip: CLIP) -> MemorizationMeasure:
    """Max CLIP image-embedding cosine to images the base model draws from the memorized caption.

    The memorized image itself is rarely at hand, but the base model reproduces it from its
    caption (that is what memorization means), so its own samples stand in for it.
    """
    config, concept = spec.config, spec.concept
    a = config.anchors
    key = jax.random.fold_in(jax.random.key(config.seed), REFERENCE_STREAM)
    references = text_to_image.draw(pipeline, pipeline.params, [concept.targets[0]] * a.memorization_references, key,
                                    config_lib.anchor_sampling(config), batch_size=a.batch_size * mesh.devices.size, mesh=mesh)
    ref_emb = image_embeddings(clip, references)

    def similarity(images: np.ndarray) -> np.ndarray:
        return (image_embeddings(clip, images) @ ref_emb.T).max(axis=1)

    return MemorizationMeasure("clip", float(a.memorization_threshold), similarity, references)


def loo_max_cosine(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """For image i: the highest cosine to a reference image other than reference i (same seed)."""
    sim = x @ ref.T
    np.fill_diagonal(sim, -np.inf)
    return sim.max(axis=1)


# (images, their CLIP embeddings, the base model's embeddings of the same seeds) -> similarity [N]
EvalSimilarity = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def eval_detector(spec: config_lib.Spec, clip: CLIP) -> tuple[str, float, EvalSimilarity]:
    """(method, threshold, similarity) for evaluating samples of the memorized caption.

    The family's own copy detector where it has one; else CLIP cosine to ``eval.memorized_image``
    when given; else, without the picture itself, a memorized caption is recognised by the base
    model drawing the same image again and again: a sample counts as a copy when it nearly
    duplicates one of the base model's other samples of that caption.
    """
    own = spec.family.copy_detector
    if own is not None:
        detector = own()
        return detector.name, detector.threshold, lambda images, emb, base_emb: detector.similarity(images)
    e = spec.config.eval
    threshold = float(e.memorization_threshold)
    if e.memorized_image:
        from PIL import Image  # noqa: PLC0415

        path = storage.path(e.memorized_image)
        if not path.is_file():
            raise MemorizationError(f"eval.memorized_image {path} does not exist")
        with path.open("rb") as f, Image.open(f) as im:
            ref = image_embeddings(clip, np.asarray(im.convert("RGB"))[None])[0]
        return "clip_reference_image", threshold, lambda images, emb, base_emb: emb @ ref
    return "clip_base_samples", threshold, lambda images, emb, base_emb: loo_max_cosine(emb, base_emb)
