"""The project's config files for the bench scripts, by name (``xattn`` -> ``configs/xattn.py``) or by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load(config: str, arg: str | None = None) -> Any:
    """``get_config(arg)`` of the config file ``config`` (a name under ``configs/`` or a path to a ``.py`` file)."""
    path = Path(config) if config.endswith(".py") else ROOT / "configs" / f"{config}.py"
    spec = importlib.util.spec_from_file_location(f"{path.stem}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
