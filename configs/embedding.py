"""Only the target's rows of the text encoder's token embedding move.

The smallest possible change: every other token, and every UNet weight, stays bit-identical.
It removes the exact spelling of the target but, unlike ``xattn.py``, not its misspellings.

    python -m ablate_jax.train --config=configs/embedding.py
"""

from ablate_jax.config import base_config, finalize


def get_config(arg: str | None = None):
    c = base_config()
    c.params = "embedding"
    return finalize(c, arg)
