#!/bin/bash
# medjax on a Cloud TPU VM pod slice (e.g. v4-32, v5p-64): install on every worker, then run the
# same training command on all of them at once.
#
# NOT RUNNABLE IN CI OR ON THIS MACHINE (no TPU, no gcloud credentials); `bash -n` checks it.
#
#   export TPU=my-v4-32 ZONE=us-central2-b [PROJECT=my-project]
#   launch/tpu_pod.sh setup                 # copy this checkout to every worker, pip install
#   launch/tpu_pod.sh train --config=configs/cxr_unet.py:paper --workdir=gs://bucket/runs/x \
#       --config.mesh.data=-1 --config.mesh.fsdp=4 [--config.key=value ...]
#   launch/tpu_pod.sh logs                  # the last lines of every worker's log (BACKGROUND=1)
#
# Everything after `train` goes to `python -m medjax.train` on each worker, quoted as given.
#
# Environment:
#   TPU, ZONE      (required) the TPU VM's name and zone.
#   PROJECT        gcloud project (default: gcloud's configured one).
#   REMOTE_DIR     where the checkout goes on each worker (default: medjax, under $HOME).
#   REPO_URL       `git clone` this URL on the workers instead of copying this checkout.
#   JAX_SPEC       the JAX requirement to install (default: jax[tpu]).
#   COORD_PORT     jax.distributed coordinator port on worker 0 (default 8476).
#   BACKGROUND=1   train under nohup (survives a dropped ssh); output in ~/medjax-train.log.
#   XLA_FLAGS, LIBTPU_INIT_ARGS  passed on to the workers when set.
#
# Multi-host: every worker runs the same command. The script sets JAX_COORDINATOR_ADDRESS to
# worker 0's internal IP and MEDJAX_DISTRIBUTED=1, so medjax.distributed's
# maybe_initialize_distributed() calls jax.distributed.initialize(coordinator_address=...), which
# reads process id and count from the TPU VM metadata.
# (TPU_WORKER_HOSTNAMES, the other trigger, is set on GKE but not on plain TPU VMs.)
#
# Workdir: all workers write checkpoints cooperatively, so it must be shared: a GCS path
# (`gs://bucket/runs/x`) works with orbax directly (the workers' service account needs write
# access to the bucket). A local path would give every worker its own partial checkpoint.
# Data (`--config.data.root`) must be readable from every worker too.
set -euo pipefail

usage() {
  echo "usage: TPU=name ZONE=zone $0 setup | train <medjax.train flags> | logs" >&2
  exit 2
}
case "${1:-}" in setup | train | logs) ;; *) usage ;; esac
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR="${REMOTE_DIR:-medjax}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
COORD_PORT="${COORD_PORT:-8476}"
GCLOUD=(gcloud compute tpus tpu-vm)
PROJECT_ARGS=()
if [ -n "${PROJECT:-}" ]; then
  PROJECT_ARGS=(--project "$PROJECT")
fi

# Runs a bash command line on all workers of the slice.
on_all() {
  "${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" ${PROJECT_ARGS[@]+"${PROJECT_ARGS[@]}"} --worker=all --command="$1"
}

setup() {
  if [ -n "${REPO_URL:-}" ]; then
    on_all "set -e; [ -d $(printf '%q' "$REMOTE_DIR") ] || git clone $(printf '%q' "$REPO_URL") \
$(printf '%q' "$REMOTE_DIR")"
  else
    # From the repository root: this checkout, as it is (uncommitted changes included).
    local root
    root="$(cd "$(dirname "$0")/.." && pwd)"
    "${GCLOUD[@]}" scp --recurse "$root" "$TPU:$REMOTE_DIR" --zone "$ZONE" \
        ${PROJECT_ARGS[@]+"${PROJECT_ARGS[@]}"} --worker=all
  fi
  on_all "set -e; cd $(printf '%q' "$REMOTE_DIR"); python3 -m pip install -U pip; \
python3 -m pip install -e . $(printf '%q' "$JAX_SPEC") \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html; \
python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0])'"
}

train() {
  if [ "$#" -eq 0 ]; then
    echo "usage: $0 train --config=configs/<name>.py[:arg] --workdir=gs://bucket/DIR ..." >&2
    exit 2
  fi
  local ip env args cmd dir
  ip="$("${GCLOUD[@]}" describe "$TPU" --zone "$ZONE" ${PROJECT_ARGS[@]+"${PROJECT_ARGS[@]}"} \
      --format='value(networkEndpoints[0].ipAddress)')"
  env="MEDJAX_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=$ip:$COORD_PORT"
  if [ -n "${XLA_FLAGS:-}" ]; then env+=" XLA_FLAGS=$(printf '%q' "$XLA_FLAGS")"; fi
  if [ -n "${LIBTPU_INIT_ARGS:-}" ]; then
    env+=" LIBTPU_INIT_ARGS=$(printf '%q' "$LIBTPU_INIT_ARGS")"
  fi
  args="$(printf '%q ' "$@")"
  cmd="env $env python3 -m medjax.train $args"
  dir="$(printf '%q' "$REMOTE_DIR")"
  if [ "${BACKGROUND:-0}" = 1 ]; then
    on_all "cd $dir && { nohup $cmd > ~/medjax-train.log 2>&1 < /dev/null & } && \
echo started on \$(hostname)"
  else
    on_all "cd $dir && $cmd"
  fi
}

logs() {
  on_all "echo == \$(hostname); tail -n ${LINES_TO_SHOW:-20} ~/medjax-train.log"
}

case "${1:-}" in
  setup) shift; setup "$@" ;;
  train) shift; train "$@" ;;
  logs) shift; logs ;;
  *) usage ;;
esac
