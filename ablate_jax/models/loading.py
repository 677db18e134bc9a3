"""Loading diffusers-format Stable Diffusion folders and transformers CLIP folders into Flax.

Weights are read from safetensors with the NumPy API; torch is never imported and nothing
pickled is ever opened. A path may be a local folder, a ``gs://`` folder (through etils
epath) or a hub id (through huggingface_hub, when online).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from etils import epath

from ablate_jax.models.convert import ConversionError, flax_to_torch, torch_to_flax, with_prefix

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_CONVERT_HINT = (
    "convert it to safetensors first, e.g. with diffusers: "
    "StableDiffusionPipeline.from_pretrained(SRC).save_pretrained(DST, safe_serialization=True)"
)
_PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelLoadError(ValueError):
    """A model folder cannot be loaded; the message says which file or tensor and why."""


def resolve_path(path: str | os.PathLike) -> epath.Path:
    """Local folder or ``gs://`` URL as an epath; a ``owner/name`` hub id is downloaded (safetensors only).

    Named models (``"toy"``) are their family's to locate (:func:`ablate_jax.families.named_model`);
    this function sees folders and hub ids only.
    """
    text = os.fspath(path)
    if text.endswith(PICKLE_SUFFIXES) and not text.startswith("gs://") and os.path.isfile(text):
        raise ModelLoadError(f"{text} is a pickled checkpoint, which ablate_jax never loads; {_CONVERT_HINT}")
    p = epath.Path(text)
    if text.startswith("gs://") or p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{text} is not a model folder (expected a diffusers or transformers folder)")
        return p
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download  # noqa: PLC0415

            local = snapshot_download(text, allow_patterns=["*.json", "*.txt", "*.safetensors"])
        except Exception as e:  # noqa: BLE001  (any hub failure is reported the same way)
            raise ModelLoadError(f"model {text!r} is neither a local folder nor a reachable hub id ({type(e).__name__})") from e
        return epath.Path(local)
    raise ModelLoadError(f"model folder {text} does not exist")


def read_json(path: epath.Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelLoadError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from e


def _weight_files(folder: epath.Path) -> list[epath.Path]:
    """The safetensors files of one component (single file or shards), refusing pickles."""
    if not folder.is_dir():
        raise ModelLoadError(f"missing component folder {folder}")
    names = sorted(f.name for f in folder.iterdir())
    # A variant (e.g. "*.fp16.safetensors") is used only when no plain file exists.
    plain = [n for n in names if n.endswith(".safetensors") and n.count(".") == 1]
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        shards = sorted(set(read_json(folder / index[0])["weight_map"].values()))
        return [folder / s for s in shards]
    if plain:
        return [folder / n for n in plain]
    variants = [n for n in names if n.endswith(".safetensors")]
    if variants:
        return [folder / variants[0]]
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise ModelLoadError(f"{folder} holds only pickled weights ({pickled[0]}), which ablate_jax never loads; {_CONVERT_HINT}")
    raise ModelLoadError(f"{folder} has no weights (*.safetensors)")


# A safetensors header larger than this is not a header (the format's own limit is 100 MB).
_MAX_HEADER = 100_000_000


def check_safetensors(path: epath.Path) -> None:
    """Reads only the header of a safetensors file and checks it against the file's size.

    Raises :class:`ModelLoadError` naming the file for a missing file, a header that is not one,
    and a file shorter than its header says (cut off while copying or downloading).
    """
    if not path.exists():
        raise ModelLoadError(f"missing weight file {path}")
    try:
        size = int(path.stat().length) if not _is_local(path) else os.path.getsize(os.fspath(path))
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path} is not a safetensors file ({size} bytes, too short for a header)")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise ModelLoadError(f"{path} has a broken safetensors header (it claims {n:,} bytes of a "
                                     f"{size:,}-byte file)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} has a broken safetensors header ({type(e).__name__})") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} has a broken safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise ModelLoadError(f"{path} has a broken safetensors header (tensor {name!r})") from e
    if 8 + n + end > size:
        raise ModelLoadError(f"{path} is truncated: {size:,} bytes, its header needs {8 + n + end:,}; "
                             "copy or download it again")


def check_weights(folder: epath.Path) -> None:
    """Every weight file a component's loading would read exists and is whole (headers only)."""
    for f in _weight_files(folder):
        check_safetensors(f)


def read_safetensors(folder: epath.Path) -> dict[str, np.ndarray]:
    """All tensors of a component folder, by PyTorch name, as NumPy arrays."""
    tensors: dict[str, np.ndarray] = {}
    for f in _weight_files(folder):
        check_safetensors(f)
        try:
            data = safetensors.numpy.load_file(os.fspath(f)) if _is_local(f) else safetensors.numpy.load(f.read_bytes())
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise ModelLoadError(f"{f} cannot be read ({type(e).__name__}: {cli_line(e)})") from e
        tensors.update(data)
    return tensors


def cli_line(err: BaseException) -> str:
    """The first line of an error's message."""
    return next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)


def _is_local(p: epath.Path) -> bool:
    return not os.fspath(p).startswith("gs://")


def load_component(folder: epath.Path, module_cls: type, **module_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Builds ``module_cls`` from ``folder/config.json`` and loads its weights: (module, params)."""
    config = read_json(folder / "config.json")
    try:
        module = module_cls.from_config(config, **module_kwargs)
    except ValueError as e:
        raise ModelLoadError(f"{folder}/config.json: {e}") from e
    abstract = jax.eval_shape(module.init_weights, jax.random.key(0))
    tensors = read_safetensors(folder)
    if len(abstract) == 1:
        # transformers >= 5 saves CLIPTextModel without its "text_model." level; older
        # checkpoints (Stable Diffusion's text_encoder/) keep it, as the Flax tree does.
        (top,) = abstract
        if not any(k.startswith(top + ".") for k in tensors):
            tensors = with_prefix(tensors, top)
    try:
        params = torch_to_flax(tensors, abstract, what=os.fspath(folder))
    except ConversionError as e:
        raise ModelLoadError(str(e)) from e
    return module, params


@dataclasses.dataclass(eq=False)  # hashed by identity: compiled programs are cached per pipeline
class Pipeline:
    """A loaded Stable Diffusion pipeline: Flax modules, their params and the tokenizer."""

    unet: Any
    vae: Any
    text_encoder: Any
    params: dict[str, Any]  # keys "unet", "vae", "text_encoder"
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler_config: dict[str, Any]
    vae_scaling_factor: float
    sample_size: int  # the UNet's default latent side
    path: str
    model_index: dict[str, Any]

    @property
    def vae_downsample(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.vae.block_out_channels) - 1)


def load_tokenizer(folder: epath.Path) -> Any:
    from transformers import CLIPTokenizer  # noqa: PLC0415  (keeps start-up light for callers that never tokenize)

    if not folder.is_dir():
        raise ModelLoadError(f"missing component folder {folder}")
    local = os.fspath(folder)
    if not _is_local(folder):
        tmp = tempfile.mkdtemp(prefix="ablate_jax_tokenizer_")
        for f in folder.iterdir():
            (epath.Path(tmp) / f.name).write_bytes(f.read_bytes())
        local = tmp
    try:
        return CLIPTokenizer.from_pretrained(local)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{folder}: cannot load the CLIP tokenizer ({e})") from e


def check_pipeline(path: str | os.PathLike) -> epath.Path:
    """What :func:`load_pipeline` needs is there and whole (configs, weight headers, tokenizer files),
    without reading any weights; returns the folder."""
    root = resolve_path(path)
    index = read_json(root / "model_index.json")
    for name in _PIPELINE_COMPONENTS:
        if not (root / name).is_dir():
            raise ModelLoadError(f"{root} is missing the component folder {name}/")
    text_cls = (index.get("text_encoder") or [None, None])[1]
    if text_cls not in (None, "CLIPTextModel"):
        raise ModelLoadError(f"{root}: text encoder class {text_cls!r} is not supported (only CLIPTextModel)")
    for name in ("unet", "vae", "text_encoder"):
        read_json(root / name / "config.json")
        check_weights(root / name)
    read_json(root / "scheduler" / "scheduler_config.json")
    return root


def check_clip(path: str | os.PathLike) -> epath.Path:
    """What :func:`load_clip` needs is there and whole, without reading any weights; returns the folder."""
    root = resolve_path(path)
    read_json(root / "config.json")
    check_weights(root)
    return root


def load_pipeline(path: str | os.PathLike, *, dtype: Any = None, **module_kwargs: Any) -> Pipeline:
    """Reads a diffusers-format Stable Diffusion folder (``model_index.json``, ``unet/``, ...)."""
    from ablate_jax.models.clip import CLIPTextModel  # noqa: PLC0415
    from ablate_jax.models.unet import UNet2DConditionModel  # noqa: PLC0415
    from ablate_jax.models.vae import AutoencoderKL  # noqa: PLC0415

    root = check_pipeline(path)
    index = read_json(root / "model_index.json")
    kwargs = dict(module_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    unet, unet_params = load_component(root / "unet", UNet2DConditionModel, **kwargs)
    vae, vae_params = load_component(root / "vae", AutoencoderKL, **({"dtype": dtype} if dtype is not None else {}))
    text, text_params = load_component(
        root / "text_encoder", CLIPTextModel, **({"dtype": dtype} if dtype is not None else {})
    )
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    return Pipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        params={"unet": unet_params, "vae": vae_params, "text_encoder": text_params},
        tokenizer=load_tokenizer(root / "tokenizer"),
        scheduler_config=scheduler_config,
        vae_scaling_factor=float(vae.scaling_factor),
        sample_size=int(read_json(root / "unet" / "config.json").get("sample_size", 64)),
        path=os.fspath(root),
        model_index=index,
    )


@dataclasses.dataclass(eq=False)  # hashed by identity, like Pipeline
class CLIP:
    """A loaded CLIP model (text and vision towers with projections) and its preprocessing."""

    model: Any
    params: dict[str, Any]
    tokenizer: Any
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    path: str


_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(path: str | os.PathLike, *, dtype: Any = None) -> CLIP:
    """Reads a transformers ``CLIPModel`` folder (config.json, model.safetensors, tokenizer files)."""
    from ablate_jax.models.clip import CLIPModel  # noqa: PLC0415

    root = resolve_path(path)
    model, params = load_component(root, CLIPModel, **({"dtype": dtype} if dtype is not None else {}))
    pre = root / "preprocessor_config.json"
    pre_cfg = read_json(pre) if pre.exists() else {}
    return CLIP(
        model=model,
        params=params,
        tokenizer=load_tokenizer(root),
        image_size=int(read_json(root / "config.json").get("vision_config", {}).get("image_size", 224)),
        image_mean=tuple(pre_cfg.get("image_mean", _OPENAI_CLIP_MEAN)),
        image_std=tuple(pre_cfg.get("image_std", _OPENAI_CLIP_STD)),
        path=os.fspath(root),
    )


def save_torch_safetensors(
    params: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes Flax params as a PyTorch-named safetensors file (the reverse of loading)."""
    tensors = flax_to_torch(dict(params))
    target = epath.Path(path)
    data = safetensors.numpy.save(tensors, metadata=dict(metadata) if metadata else None)
    target.write_bytes(data)


def save_component(
    folder: str | os.PathLike, params: Mapping[str, Any], config: Mapping[str, Any], weights_name: str
) -> None:
    """Writes one component folder: ``config.json`` and PyTorch-named safetensors weights."""
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    save_torch_safetensors(params, folder / weights_name, metadata={"format": "pt"})
