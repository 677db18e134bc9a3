#!/usr/bin/env bash
# One prepared run for a machine with an NVIDIA GPU: Stable Diffusion 1.x at full size (random
# weights, bfloat16 compute), anchor images/s and train steps/s with the fraction of the chip's
# bf16 peak from XLA's FLOP counts, then the train step's memory per remat setting (XLA's plan and
# the device's peak bytes in use, a fresh process each). Prints a table and writes OUT_DIR/gpu.md
# and gpu.json.
#
#   bash bench/gpu.sh [OUT_DIR] [extra bench/gpu.py flags, e.g. --batch=16 --attention=xla]
#
# Run from the repository root, with the Python that already holds JAX for the GPU (PYTHON,
# default python3). Nothing is downloaded: the package goes in without its dependencies, and what
# that Python lacks (ml_collections) is installed from the wheels in WHEELS (default .whl, an
# ignored folder that `bash bench/gpu_wheels.sh` fills on a machine with an index). Nothing it runs
# imports TensorFlow. `bash bench/gpu_dryrun.sh` checks all of this on a CPU.
set -euo pipefail
OUT="${1:-bench-gpu}"
shift || true
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/ablate_jax-site}"
MEMORY_SETTINGS="${MEMORY_SETTINGS:-xattn_kv:none xattn_kv:attention xattn_kv:blocks full:none full:blocks}"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
mkdir -p "$SITE"
if (( ${#wheels[@]} )); then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import jax; print('devices:', jax.devices())"
# The default XLA GPU settings; the memory fraction leaves room for cuDNN's workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
mkdir -p "$OUT"
: > "$OUT/memory.jsonl"
for setting in $MEMORY_SETTINGS; do
  "$PY" bench/gpu.py --memory="$setting" "$@" | grep '^{' >> "$OUT/memory.jsonl" \
    || echo "memory run $setting failed" >&2
done
"$PY" bench/gpu.py --out="$OUT" --memory-rows="$OUT/memory.jsonl" "$@"
