#!/usr/bin/env bash
# A CPU rehearsal of bench/gpu.sh as the GPU machine runs it: a fresh virtual environment holding
# only stand-ins for the image's packages (JAX, flax, optax, orbax-checkpoint, transformers,
# safetensors and what they need; no ml_collections, clu, diffusers, TensorFlow or TFDS), every
# package installed with --no-index from wheel folders, then bench/gpu.sh at a tiny size.
#
#   bash bench/gpu_wheels.sh && bash bench/gpu_dryrun.sh [OUT_DIR]
set -euo pipefail
OUT="${1:-/tmp/ablate_jax-gpu-dryrun}"
WORK="${WORK:-/tmp/ablate_jax-gpu-dryrun-env}"
IMAGE_WHEELS="$WORK/image-wheels"
# The image's packages that the benchmark touches (their own needs come along).
IMAGE_PACKAGES=(jax flax optax orbax-checkpoint transformers safetensors absl-py etils fsspec pyyaml tqdm pillow numpy
  huggingface_hub setuptools wheel)
rm -rf "$WORK/venv" "$OUT"
mkdir -p "$IMAGE_WHEELS"
python3 -m pip download -q -d "$IMAGE_WHEELS" "${IMAGE_PACKAGES[@]}"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --no-index --find-links "$IMAGE_WHEELS" "${IMAGE_PACKAGES[@]}"
for absent in ml_collections clu diffusers tensorflow tensorflow_datasets; do
  if "$WORK/venv/bin/python" -c "import $absent" 2>/dev/null; then
    echo "dry run: $absent is in the stand-in image; it must not be" >&2
    exit 1
  fi
done
PYTHON="$WORK/venv/bin/python" SITE="$WORK/site" MEMORY_SETTINGS="xattn_kv:none xattn_kv:blocks" \
  bash bench/gpu.sh "$OUT" --size=tiny --resolution=64 --batch=2 --sample-steps=2 --reps=1
grep -q "TensorFlow imported: no" "$OUT/gpu.md"
echo "dry run passed: $OUT/gpu.md"
