"""Stable Diffusion 1.x and 2.x: the paper's schedules, evaluator and concept presets.

The family is read from the folder's ``unet/config.json`` (768-wide text states: 1.x, 1024-wide:
2.x); a hub id or a folder that cannot be read here is ``sd``, with the same values.
"""

from __future__ import annotations

import json
import os
from types import MappingProxyType

from ablate_jax.concepts import Concept, EvalSet, builtin_prompts
from ablate_jax.families import Family

# Learning rate and steps per parameter group (global batch 8): the paper's values (2e-6 per
# example for cross-attention, 2e-6 for full fine-tuning); the embedding value is a starting
# point, not a tuned figure.
SCHEDULE = MappingProxyType({"xattn_kv": (1.6e-5, 200), "xattn": (1.6e-5, 200), "attn": (1.6e-5, 200),
                             "full": (2e-6, 400), "embedding": (1e-3, 200)})


def _key(concept: str) -> str:
    return concept.replace(" ", "_").replace("-", "_")


def _instance(target: str, anchor: str, anchor_set: str, preserve: tuple[str, ...], held_out: tuple[str, ...],
              paraphrase: bool = True) -> Concept:
    sets = [EvalSet(_key(target), "target", target, builtin_prompts(f"eval/{_key(target)}"))]
    if paraphrase:
        sets.append(EvalSet(f"{_key(target)}_paraphrase", "target_paraphrase", target,
                            builtin_prompts(f"eval/{_key(target)}_paraphrase")))
    sets.append(EvalSet(_key(anchor), "anchor", anchor, builtin_prompts(f"eval/{_key(anchor)}")))
    sets += [EvalSet(_key(c), "preserved", c, builtin_prompts(f"eval/{_key(c)}")) for c in preserve]
    sets += [EvalSet(_key(c), "surrounding", c, builtin_prompts(f"eval/{_key(c)}")) for c in held_out]
    return Concept("instance", (target,), anchor, builtin_prompts(anchor_set), preserve, tuple(sets))


def _style(target: str, preserve: tuple[str, ...], held_out: tuple[str, ...], paraphrase: bool = False) -> Concept:
    key = lambda c: c.replace(" ", "_")  # noqa: E731
    sets = [EvalSet(key(target), "target", target, builtin_prompts(f"eval/{key(target)}"))]
    if paraphrase:
        sets.append(EvalSet(f"{key(target)}_paraphrase", "target_paraphrase", target,
                            builtin_prompts(f"eval/{key(target)}_paraphrase")))
    sets.append(EvalSet("painting", "anchor", "painting", builtin_prompts("eval/painting")))
    sets += [EvalSet(key(c), "preserved", c, builtin_prompts(f"eval/{key(c)}")) for c in preserve]
    sets += [EvalSet(key(c), "surrounding", c, builtin_prompts(f"eval/{key(c)}")) for c in held_out]
    return Concept("style", (target,), "painting", builtin_prompts("anchor_painting"), preserve, tuple(sets))


_CATS = ("tabby cat", "siamese cat", "persian cat", "sphynx cat")
_DOGS = ("beagle", "golden retriever", "dalmatian", "corgi")
_FISH = ("goldfish", "angelfish", "betta fish", "pufferfish")
_ROBOTS = ("c3po", "wall-e", "bb8", "industrial robot")
_PAINTERS = ("paul cezanne", "pablo picasso", "rembrandt", "frida kahlo", "edvard munch", "katsushika hokusai")

# The paper's concepts: the first two neighbours of each are preserved, the rest held out.
PRESETS = MappingProxyType({
    "grumpy_cat": lambda: _instance("grumpy cat", "cat", "anchor_cat", _CATS[:2], _CATS[2:]),
    "snoopy": lambda: _instance("snoopy", "dog", "anchor_dog", _DOGS[:2], _DOGS[2:]),
    "nemo": lambda: _instance("nemo", "fish", "anchor_fish", _FISH[:2], _FISH[2:]),
    "r2d2": lambda: _instance("r2d2", "robot", "anchor_robot", _ROBOTS[:2], _ROBOTS[2:]),
    "van_gogh": lambda: _style("van gogh", _PAINTERS[:3], _PAINTERS[3:], paraphrase=True),
    "monet": lambda: _style("monet", _PAINTERS[:3], _PAINTERS[3:]),
    "salvador_dali": lambda: _style("salvador dali", _PAINTERS[:3], _PAINTERS[3:]),
    "greg_rutkowski": lambda: _style("greg rutkowski", _PAINTERS[:3], _PAINTERS[3:]),
})


def _family(name: str, title: str) -> Family:
    # At 512 pixels the VAE encoder's activations for a batch of 8 take gigabytes: eight calls of one
    # row per device keep them small.
    return Family(name=name, title=title, schedule=SCHEDULE, anchor_count=1000, encode_chunks=8, presets=PRESETS)


SD1 = _family("sd1", "Stable Diffusion (sd1)")
SD2 = _family("sd2", "Stable Diffusion (sd2)")
SD = _family("sd", "Stable Diffusion")
FAMILIES = (SD1, SD2, SD)


def detect(model: str) -> Family:
    """``sd1`` or ``sd2`` from the folder's ``unet/config.json``; ``sd`` when it cannot be read here (a hub id)."""
    from etils import epath  # noqa: PLC0415

    text = os.fspath(model)
    if "://" not in text and not os.path.isdir(os.path.expanduser(text)):
        return SD
    try:
        unet = json.loads((epath.Path(os.path.expanduser(text)) / "unet" / "config.json").read_text())
    except Exception:  # noqa: BLE001  (unreadable here: the loader reports it with the reason)
        return SD
    width = unet.get("cross_attention_dim")
    return {768: SD1, 1024: SD2}.get(width if isinstance(width, int) else -1, SD)
