"""Robust ablation: attention layers trained against an adversary, on misspelled target prompts and in random contexts.

Each train step first finds, by three steps of projected gradient ascent, the perturbation of the
target word's embedding (within its own norm) under which the model strays furthest from the
anchor, and trains the ablation there too; a quarter of the target prompts misspell the target's
word, and a quarter of the examples put random vocabulary words before every prompt, as a prompt
search does. The attention layers (self and cross) train, not only the cross-attention keys and values:
with those alone a learned token embedding still draws the target (docs/attacks.md). Evaluation
runs every attack against the base and the ablated model.

    python -m ablate_jax.train --config=configs/robust.py
"""

from ablate_jax.config import base_config, finalize


def get_config(arg: str | None = None):
    c = base_config()
    c.params = "attn"
    c.robust.adversarial = True
    c.robust.misspell = 0.25
    c.robust.context = 0.25
    c.eval.attacks = "all"
    return finalize(c, arg)
