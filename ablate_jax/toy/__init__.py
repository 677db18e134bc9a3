"""The toy world: procedurally drawn scenes with captions, and a CLIP-format tokenizer trained on them.

A miniature text-to-image world in which concept ablation can be trained and measured offline on a CPU:
``ablate_jax.toy.world`` draws one object (a shape, or a face-bearing circle "instance") on a background
style, and ``ablate_jax.toy.tokenizer`` writes a byte-level BPE tokenizer that ``transformers.CLIPTokenizer``
loads.
"""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"


def shipped_path(component: str = "pipeline") -> Path:
    """Folder of the shipped toy model: ``pipeline`` (diffusers Stable Diffusion) or ``clip`` (the evaluator)."""
    if component not in ("pipeline", "clip"):
        raise ValueError(f"the toy world ships 'pipeline' and 'clip', not {component!r}")
    path = ASSETS / component
    if not (path / "config.json").exists() and not (path / "model_index.json").exists():
        raise FileNotFoundError(f"the toy model is missing from {path}; run python -m ablate_jax.toy.pretrain --out {ASSETS}")
    return path
