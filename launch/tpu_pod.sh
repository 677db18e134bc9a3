#!/usr/bin/env bash
# Runs an ablation on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh --name=ablate-v5e --zone=us-west4-a --type=v5litepod-16 \
#       --workdir=gs://BUCKET/runs/smiley \
#       [--config=configs/xattn.py:concept=grumpy_cat,model=gs://BUCKET/sd-v1-4] \
#       [--mount-bucket=BUCKET] [--project=P] [--version=tpu-ubuntu2204-base] [--create] [--delete] [--dry-run]
#       [-- EXTRA TRAIN FLAGS]
#
# Steps: create the slice (--create); copy this checkout's source to every worker and install
# it with jax[tpu]; run `python -m ablate_jax.train --distributed` on all workers at once (one
# JAX process per worker; the TPU runtime gives jax.distributed the coordinator); stream their
# logs here and into launch-logs/; delete the slice (--delete), also after a failed run.
# The workdir must be one folder that every worker reaches: a gs:// URL (read and written through
# Cloud Storage's own clients), or an absolute path on a shared mount; --mount-bucket=B mounts
# the bucket B at /gcs/B on every worker with gcsfuse (which the VM image must provide).
# --dry-run prints the exact commands and runs none of them.
set -euo pipefail
source "$(dirname "$0")/common.sh"

NAME="" ZONE="" TYPE="" PROJECT="" VERSION="tpu-ubuntu2204-base"
CONFIG="configs/xattn.py" WORKDIR="" BUCKET="" CREATE=0 DELETE=0
EXTRA=()
while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --mount-bucket=*) BUCKET="${1#*=}" ;;
    --create) CREATE=1 ;;
    --delete) DELETE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for required in NAME ZONE WORKDIR; do
  if [[ -z "${!required}" ]]; then echo "error: --${required,,} is required (see --help)" >&2; exit 2; fi
done
if ((CREATE)) && [[ -z "$TYPE" ]]; then echo "error: --create needs --type, e.g. --type=v5litepod-16" >&2; exit 2; fi
if [[ "$WORKDIR" != /* && "$WORKDIR" != gs://* ]]; then
  echo "error: --workdir must be a gs:// URL or an absolute path that every worker reaches, e.g. gs://BUCKET/run" >&2
  exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
ARCHIVE="${TMPDIR:-/tmp}/ablate_jax-src-$NAME.tgz"
RUN_LOG="$ROOT/launch-logs/$NAME-$(date +%Y%m%d-%H%M%S).log"

cleanup() { if ((DELETE)); then run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet; fi; }
trap cleanup EXIT

if ((CREATE)); then
  run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION"
fi

pack_source "$ROOT" "$ARCHIVE"
run "${TPU[@]}" scp "$ARCHIVE" "$NAME:ablate_jax-src.tgz" "${WHERE[@]}" --worker=all
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command="rm -rf ablate_jax && mkdir ablate_jax && tar -C ablate_jax -xzf ablate_jax-src.tgz && pip install -q -U pip && pip install -q -U \"jax[tpu]\" ./ablate_jax"

if [[ -n "$BUCKET" ]]; then
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
    --command="sudo mkdir -p /gcs/$BUCKET && sudo chown \$USER /gcs/$BUCKET && (mountpoint -q /gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET)"
fi

# The same command on every worker; --distributed: the TPU runtime supplies the coordinator
# address, the process count and this worker's index.
TRAIN="cd ablate_jax && python3 -m ablate_jax.train $(quote "--config=$CONFIG") $(quote "--workdir=$WORKDIR") --distributed"
for arg in "${EXTRA[@]}"; do TRAIN+=" $(quote "$arg")"; done
if ((DRY_RUN)); then
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$TRAIN"
else
  mkdir -p "$(dirname "$RUN_LOG")"
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$TRAIN" 2>&1 | tee "$RUN_LOG"
  echo "log: $RUN_LOG"
fi
