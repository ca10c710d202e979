#!/usr/bin/env bash
# MS3 pretraining on a Cloud TPU VM pod slice: create, copy the repo, run main on every worker.
#
#   TPU_NAME=ms3 ZONE=us-central2-b ACCELERATOR=v4-32 WORKDIR=gs://BUCKET/ms3_pretrain \
#   DATA_DIR=gs://BUCKET/tfds launch/tpu_vm_pod.sh [--config.batch_size=256 ...]
#
# One process per TPU VM worker; JAX's cluster detection reads the pod from the TPU metadata, so
# no MS3_* variables are needed (ms3_jax.engine.processes.initialize_distributed). The workers first meet
# at worker 0 on the coordinator's port + 1 (8483; JAX_COORDINATOR_PORT moves both): a missing or
# dead worker ends the others with exit 1, naming it.
# WORKDIR and DATA_DIR must be visible to every worker (a GCS bucket). Skip creation with CREATE=0.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
WORKDIR=${WORKDIR:?set WORKDIR (e.g. gs://bucket/ms3_pretrain)}
DATA_DIR=${DATA_DIR:?set DATA_DIR (prepared tfds datasets, e.g. gs://bucket/tfds)}
CONFIG=${CONFIG:-configs/pretrain.py}
REPO=$(cd "$(dirname "$0")/.." && pwd)

if [[ "${CREATE:-1}" == 1 ]]; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION"
fi

# The archive is built in a fresh private directory (never a fixed /tmp name another user could
# plant a link at, or swap the archive under), removed on exit.
STAGE=$(mktemp -d -t ms3_jax_pod.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
tar -C "$REPO" --exclude=.git --exclude='*.egg-info' -czf "$STAGE/ms3_jax.tgz" .
gcloud compute tpus tpu-vm scp "$STAGE/ms3_jax.tgz" "$TPU_NAME":~/ --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  mkdir -p ~/ms3_jax && tar -C ~/ms3_jax -xzf ~/ms3_jax.tgz && cd ~/ms3_jax
  pip install -q -e '.[tpu]'
  python -m ms3_jax.main --config=$CONFIG --workdir=$WORKDIR --config.data.data_dir=$DATA_DIR $*
"
