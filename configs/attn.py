"""Every attention projection (self- and cross-attention) with the model-based loss.

More capacity than ``xattn.py``; moves more of the model, so check the surrounding sets.

    python -m ablate_jax.train --config=configs/attn.py
"""

from ablate_jax.config import base_config, finalize


def get_config(arg: str | None = None):
    c = base_config()
    c.params = "attn"
    return finalize(c, arg)
