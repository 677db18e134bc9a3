"""Every UNet weight, for memorized images, with prior preservation.

The memorized caption is mapped to what its paraphrases draw; the prior term (``prior_weight``,
resolved to 1 for this group) keeps the paraphrases themselves unchanged, and a memorized image is
trained on as drawn (no rescale augmentation).

    python -m ablate_jax.train --config=configs/full.py
    python -m ablate_jax.train --config=configs/full.py:model=/data/stable-diffusion-v1-4,concept.target="..."

On the toy world (50 steps at 1e-4): the memorized caption reproduces its image in 1.00 -> 0.00
of samples and draws an orange star in all of them; the orange-star prompts stay at 1.00.
"""

from ablate_jax.config import base_config, finalize


def get_config(arg: str | None = None):
    c = base_config()
    c.params = "full"
    c.concept.preset = "toy_memorized"
    return finalize(c, arg)
