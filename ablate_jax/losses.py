"""The ablation objectives (docs/design.md, "Objectives"), as pure functions of two denoisers.

All terms are mean squared errors over the valid (masked) part of the latent:

- model-based: the student under the target prompt matches the teacher under the anchor prompt;
- noise-based: the student under the target prompt regresses the true noise (or v);
- prior preservation (``prior_weight``): the student under the anchor prompt regresses the true noise;
- surrounding-concept preservation (``preserve_weight``): the student under a prompt naming a
  concept to keep matches the frozen teacher under the same prompt;
- adversarial (``adversarial_weight``, robust ablation): the ablation term again, for the
  student under the target prompt with its words' embeddings perturbed to undo the ablation.

Student passes that share their noisy latents go through one batched UNet call, and so do the
teacher's; with ``teacher="online"`` the teacher is the student under stop-gradient, so its pass
joins the student's call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

LOSSES = ("model_based", "noise_based")
TEACHERS = ("frozen", "online")

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x_t, t, context) -> prediction


@dataclasses.dataclass(frozen=True)
class LossConfig:
    loss: str = "model_based"
    teacher: str = "frozen"
    prior_weight: float = 0.0
    preserve_weight: float = 0.0
    adversarial_weight: float = 0.0

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.prior_weight < 0 or self.preserve_weight < 0 or self.adversarial_weight < 0:
            raise ValueError("prior_weight, preserve.weight and robust.weight must be >= 0")
        if self.preserve_weight > 0 and self.teacher != "frozen":
            # The online teacher is the student itself: the term would be identically zero.
            raise ValueError("surrounding-concept preservation needs teacher='frozen'")

    @property
    def uses_teacher(self) -> bool:
        return self.loss == "model_based" or self.preserve_weight > 0

    @property
    def needs_keep(self) -> bool:
        return self.preserve_weight > 0


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``(pred - target)^2`` over the entries where ``mask`` is 1.

    ``mask`` is ``[B, h, w, 1]`` and broadcasts over channels; the mean counts channels too, so
    a full mask gives the plain MSE.
    """
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    m = jnp.broadcast_to(mask.astype(jnp.float32), err.shape)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)


def ablation_loss(
    student: Denoiser,
    teacher: Denoiser,
    x_t: jax.Array,
    t: jax.Array,
    contexts: Mapping[str, jax.Array],
    regress_target: jax.Array,
    mask: jax.Array,
    cfg: LossConfig,
    teacher_anchor: jax.Array | None = None,
    weights: Mapping[str, jax.Array] | None = None,
    keep_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss and its terms.

    ``keep_weight`` ``[B]``: which rows the preservation term counts (0 or 1; all when None), for a
    batch that mixes concepts of which some have nothing to preserve; the others still count in
    its mean as zero error.

    ``weights``: values (``prior``, ``preserve``, ``adversarial``) that replace ``cfg``'s weights as
    multipliers, for a sweep whose runs differ in them (:mod:`ablate_jax.sweep`); which terms exist
    still follows ``cfg``.

    ``teacher_anchor``: the frozen teacher's prediction under the anchor prompt, when the caller
    already has it (robust ablation's adversary needs it first); it is then not computed again.

    ``contexts`` holds text-encoder states ``[B, L, D]``: ``student_target`` (always),
    ``anchor`` (model-based or prior), ``student_anchor`` (prior; may equal ``anchor``),
    ``keep`` and ``student_keep`` (preservation), ``student_adversarial`` (the perturbed target
    prompt, when ``adversarial_weight``). ``regress_target`` is the true noise (or v).
    """
    # One batched student call: the target pass, then whatever else shares these latents.
    student_ctx = [contexts["student_target"]]
    parts = ["target"]
    if cfg.prior_weight > 0:
        student_ctx.append(contexts["student_anchor"])
        parts.append("prior")
    if cfg.preserve_weight > 0:
        student_ctx.append(contexts["student_keep"])
        parts.append("keep")
    if cfg.adversarial_weight > 0:
        student_ctx.append(contexts["student_adversarial"])
        parts.append("adversarial")
    online_teacher = cfg.loss == "model_based" and cfg.teacher == "online"
    if online_teacher:
        student_ctx.append(contexts["anchor"])
        parts.append("online_teacher")
    n = len(parts)
    out = student(jnp.tile(x_t, (n, 1, 1, 1)), jnp.tile(t, (n,)), jnp.concatenate(student_ctx))
    pred = dict(zip(parts, jnp.split(out, n), strict=True))

    teacher_pred: dict[str, jax.Array] = {}
    if online_teacher:
        teacher_pred["anchor"] = jax.lax.stop_gradient(pred.pop("online_teacher"))
    frozen_parts, frozen_ctx = [], []
    if cfg.loss == "model_based" and cfg.teacher == "frozen" and teacher_anchor is not None:
        teacher_pred["anchor"] = jax.lax.stop_gradient(teacher_anchor)
    elif cfg.loss == "model_based" and cfg.teacher == "frozen":
        frozen_parts.append("anchor")
        frozen_ctx.append(contexts["anchor"])
    if cfg.preserve_weight > 0:
        frozen_parts.append("keep")
        frozen_ctx.append(contexts["keep"])
    if frozen_parts:
        k = len(frozen_parts)
        out = teacher(jnp.tile(x_t, (k, 1, 1, 1)), jnp.tile(t, (k,)), jnp.concatenate(frozen_ctx))
        teacher_pred.update(zip(frozen_parts, jnp.split(jax.lax.stop_gradient(out), k), strict=True))

    weight = {"prior": cfg.prior_weight, "preserve": cfg.preserve_weight, "adversarial": cfg.adversarial_weight,
              **(weights or {})}
    terms: dict[str, jax.Array] = {}
    ablation_target = teacher_pred["anchor"] if cfg.loss == "model_based" else regress_target
    terms["ablation"] = masked_mse(pred["target"], ablation_target, mask)
    total = terms["ablation"]
    if cfg.adversarial_weight > 0:
        terms["adversarial"] = masked_mse(pred["adversarial"], ablation_target, mask)
        total = total + weight["adversarial"] * terms["adversarial"]
    if cfg.prior_weight > 0:
        terms["prior"] = masked_mse(pred["prior"], regress_target, mask)
        total = total + weight["prior"] * terms["prior"]
    if cfg.preserve_weight > 0:
        kept, reference = pred["keep"], teacher_pred["keep"]
        if keep_weight is not None:
            # Rows left out count as zero error in the mean over every row, so the loss of a batch that
            # mixes concepts is the sum of each concept's loss alone weighted by its share of the rows.
            w = keep_weight[:, None, None, None].astype(kept.dtype)
            kept, reference = kept * w, reference * w
        terms["preserve"] = masked_mse(kept, reference, mask)
        total = total + weight["preserve"] * terms["preserve"]
    return total, terms
