"""Cross-attention key/value fine-tuning with the model-based loss and a frozen teacher.

The paper's default: only the key and value projections of cross-attention move, so the text
of the target stops steering the image towards it, while the rest of the model is untouched.

    python -m ablate_jax.train --config=configs/xattn.py
    python -m ablate_jax.train --config=configs/xattn.py:concept=toy_striped
    python -m ablate_jax.train --config=configs/xattn.py:concept=grumpy_cat,model=/data/stable-diffusion-v1-4
    python -m ablate_jax.train --config=configs/xattn.py:loss=noise_based

On the toy world the default removes the smiley (CLIP accuracy 1.00 -> 0.00, and its description
without the name 1.00 -> 0.00) and keeps every image of its preserved and held-out face
siblings, the anchor, stars and squares.

The arg string takes ``concept=PRESET``, ``model=PATH`` and any other ``key=value`` of the
config; ``--config.train.steps=100`` style flags work as well. Results on the toy world are in
the README and docs/results.md.
"""

from ablate_jax.config import base_config, finalize


def get_config(arg: str | None = None):
    c = base_config()
    c.params = "xattn_kv"
    c.loss = "model_based"
    c.teacher = "frozen"
    return finalize(c, arg)
