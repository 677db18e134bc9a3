"""Robust ablation: cross-attention keys and values, trained against an adversary, every attack measured.

Each train step first finds, by three steps of projected gradient ascent, the perturbation of the
target word's embedding (within its own norm) under which the model strays furthest from the
anchor, and trains the ablation there too. Evaluation runs every attack against the base and the
ablated model (docs/attacks.md). ``robust.misspell`` adds misspelled target prompts to training.

    python -m ablate_jax.train --config=configs/robust.py
"""

from ablate_jax.config import base_config, finalize


def get_config(arg: str | None = None):
    c = base_config()
    c.params = "xattn_kv"
    c.robust.adversarial = True
    c.eval.attacks = "all"
    return finalize(c, arg)
