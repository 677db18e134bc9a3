"""Only the target's rows of the text encoder's token embedding move.

The smallest possible change: every other token, and every UNet weight, stays bit-identical.
It removes the exact spelling of the target but, unlike ``xattn.py``, not a description of it
without its name, nor its misspellings. On the toy world: smiley 1.00 -> 0.00, every other set
bit-identical.

    python -m ablate_jax.train --config=configs/embedding.py
"""

from ablate_jax.config import base_config, finalize


def get_config(arg: str | None = None):
    c = base_config()
    c.params = "embedding"
    return finalize(c, arg)
