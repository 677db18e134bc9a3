"""The toy world: procedurally drawn scenes with captions, and a CLIP-format tokenizer trained on them.

A miniature text-to-image world in which concept ablation can be trained and measured offline on a CPU:
``ablate_jax.toy.world`` draws one object (a shape, or a face-bearing circle "instance") on a background
style, and ``ablate_jax.toy.tokenizer`` writes a byte-level BPE tokenizer that ``transformers.CLIPTokenizer``
loads.
"""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
# ``toy.pretrain`` writes this file into the pipeline and evaluator folders it makes (diffusers and
# transformers ignore it). A folder that has it gets what ``model="toy"`` gets: the toy world's
# learning rates, preservation and anchor count, its prompt phrasing for the evaluator, and its
# own memorization measure; without it, a retrained toy model would be run with Stable
# Diffusion's schedule, which barely moves it.
MARKER = "toy_world.json"


def is_toy_world(model: str) -> bool:
    """Whether ``model`` is the shipped toy model (``"toy"``) or a local folder ``toy.pretrain`` wrote."""
    if model == "toy":
        return True
    if not model or "://" in model:
        return False
    return (Path(model).expanduser() / MARKER).is_file()


def write_marker(folder: Path) -> None:
    """Marks ``folder`` (a pipeline or an evaluator written by ``toy.pretrain``) as a toy-world model."""
    (Path(folder) / MARKER).write_text('{"world": "ablate_jax.toy"}\n')


def shipped_path(component: str = "pipeline") -> Path:
    """Folder of the shipped toy model: ``pipeline`` (diffusers Stable Diffusion) or ``clip`` (the evaluator)."""
    if component not in ("pipeline", "clip"):
        raise ValueError(f"the toy world ships 'pipeline' and 'clip', not {component!r}")
    path = ASSETS / component
    if not (path / "config.json").exists() and not (path / "model_index.json").exists():
        raise FileNotFoundError(f"the toy model is missing from {path}; run python -m ablate_jax.toy.pretrain --out {ASSETS}")
    return path
