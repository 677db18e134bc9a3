#!/usr/bin/env bash
# Fills WHEELS (default .whl, ignored by git) with what the GPU machines' Python lacks for
# bench/gpu.sh, as wheels for CPython 3.12 on x86-64 Linux. Run here, where an index is reachable;
# the GPU machine then installs them with --no-index. The image already holds JAX, flax, optax,
# orbax-checkpoint, transformers, safetensors, absl-py, etils, fsspec, PyYAML, tqdm and pillow.
set -euo pipefail
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$WHEELS"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" "ml_collections==1.1.0"
ls "$WHEELS"
