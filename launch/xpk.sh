#!/usr/bin/env bash
# Runs an ablation as an xpk workload on a GKE cluster of TPU slices.
#
#   launch/xpk.sh --cluster=my-cluster --workload=ablate-smiley --tpu-type=v5litepod-16 \
#       --workdir=gs://BUCKET/runs/smiley [--num-slices=1] [--project=P] [--zone=Z] \
#       [--config=configs/xattn.py:concept=grumpy_cat,model=gs://BUCKET/sd-v1-4] \
#       [--base-image=python:3.11] [--delete] [--dry-run] [-- EXTRA TRAIN FLAGS]
#
# xpk builds an image from --base-image with a copy of this checkout (only the package's source
# and configs/, staged in a temporary folder), installs it with jax[tpu] and runs
# `python -m ablate_jax.train --distributed` on every host of the slices (one JAX process per
# host; the TPU runtime gives jax.distributed the coordinator). The workdir must be a folder
# every host reaches: a gs:// URL, or a path where the cluster mounts a shared volume.
# --delete removes the workload
# instead of creating one. --dry-run prints the exact commands and runs none of them.
set -euo pipefail
source "$(dirname "$0")/common.sh"

CLUSTER="" WORKLOAD="" TPU_TYPE="" NUM_SLICES=1 PROJECT="" ZONE=""
CONFIG="configs/xattn.py" WORKDIR="" BASE_IMAGE="python:3.11" DELETE=0
EXTRA=()
while (($#)); do
  case "$1" in
    --cluster=*) CLUSTER="${1#*=}" ;;
    --workload=*) WORKLOAD="${1#*=}" ;;
    --tpu-type=*) TPU_TYPE="${1#*=}" ;;
    --num-slices=*) NUM_SLICES="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --base-image=*) BASE_IMAGE="${1#*=}" ;;
    --delete) DELETE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for required in CLUSTER WORKLOAD; do
  if [[ -z "${!required}" ]]; then echo "error: --${required,,} is required (see --help)" >&2; exit 2; fi
done
WHERE=(--cluster="$CLUSTER")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
[[ -n "$ZONE" ]] && WHERE+=(--zone="$ZONE")

if ((DELETE)); then
  run xpk workload delete --workload="$WORKLOAD" "${WHERE[@]}"
  exit 0
fi
if [[ -z "$TPU_TYPE" || -z "$WORKDIR" ]]; then
  echo "error: --tpu-type and --workdir are required to create a workload (see --help)" >&2; exit 2
fi
if [[ "$WORKDIR" != /* && "$WORKDIR" != gs://* ]]; then
  echo "error: --workdir must be a gs:// URL or an absolute path that every host reaches" >&2; exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SCRIPT_DIR="${TMPDIR:-/tmp}/ablate_jax-xpk-$WORKLOAD"
run rm -rf "$SCRIPT_DIR"
run mkdir -p "$SCRIPT_DIR"
pack_source "$ROOT" "$SCRIPT_DIR/ablate_jax-src.tgz"

COMMAND="mkdir -p /app && tar -C /app -xzf ablate_jax-src.tgz && pip install -q \"jax[tpu]\" /app && cd /app"
COMMAND+=" && python3 -m ablate_jax.train $(quote "--config=$CONFIG") $(quote "--workdir=$WORKDIR") --distributed"
for arg in "${EXTRA[@]}"; do COMMAND+=" $(quote "$arg")"; done
run xpk workload create --workload="$WORKLOAD" "${WHERE[@]}" --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" \
  --base-docker-image="$BASE_IMAGE" --script-dir="$SCRIPT_DIR" --command="$COMMAND"
echo "follow it with: xpk workload list ${WHERE[*]} --filter-by-job=$WORKLOAD"
