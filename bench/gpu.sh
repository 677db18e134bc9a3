#!/usr/bin/env bash
# One prepared run for a machine with an NVIDIA GPU: Stable Diffusion 1.x at full size (random
# weights, bfloat16 compute), anchor images/s and train steps/s with the fraction of the chip's
# bf16 peak from XLA's FLOP counts. Prints a table and writes OUT_DIR/gpu.md and gpu.json.
#
#   bash bench/gpu.sh [OUT_DIR] [extra bench/gpu.py flags, e.g. --batch=16 --attention=xla]
#
# Run from the repository root. Installs the package with JAX's CUDA build into .venv-gpu
# unless JAX there already sees a GPU.
set -euo pipefail
OUT="${1:-bench-gpu}"
shift || true
VENV="${VENV:-.venv-gpu}"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q -U "jax[cuda12]" -e .
fi
"$VENV/bin/python" -c "import jax; print('devices:', jax.devices())"
# The default XLA GPU settings; the memory fraction leaves room for cuDNN's workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
"$VENV/bin/python" bench/gpu.py --out="$OUT" "$@"
