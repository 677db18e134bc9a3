"""The import-layer contracts (pyproject.toml) cover every module of the core, and they hold."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def test_every_core_module_is_forbidden_the_toy_world():
    # A module added to the package is under the contract from the start; only the toy world
    # itself (and the tests' and benches' own code, outside the package) may import it.
    package = ROOT / "ablate_jax"
    core = {f"ablate_jax.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    core |= {f"ablate_jax.{p.name}" for p in package.iterdir() if (p / "__init__.py").exists() and p.name != "toy"}
    contract = _contracts()["The core never imports the toy world (it plugs in as a model family)"]
    assert contract["forbidden_modules"] == ["ablate_jax.toy"]
    assert set(contract["source_modules"]) == core


def test_the_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout
