#!/bin/bash
# One medjax training run on N nodes x G GPUs under SLURM.
#
#   sbatch --nodes=2 launch/slurm_multi_gpu.sh --config=configs/cxr_unet.py:paper \
#       --workdir=/shared/runs/x [--config.key=value ...]
#   sbatch --nodes=4 --gpus-per-node=4 --partition=gpu --time=48:00:00 launch/slurm_multi_gpu.sh ...
#
# Everything after the script name goes to `python -m medjax.train` unchanged
# (`sbatch --export=ALL,MEDJAX_MODULE=medjax.evaluate ...` runs medjax.evaluate or medjax.export
# the same way: every process over all GPUs, process 0 writing the files). Submit from the
# repository root with medjax's Python environment active (sbatch passes the environment on).
# Command-line sbatch options override the #SBATCH defaults below.
#
# How it runs: one task per node (`--ntasks-per-node=1`) that sees all of the node's GPUs
# (`--gpus-per-node=G`). With several nodes, medjax.distributed.maybe_initialize_distributed()
# sees SLURM_NTASKS > 1 and calls jax.distributed.initialize(), which reads the coordinator
# (first node), process count and process id from SLURM's environment; every process then runs
# the same program over the global mesh. One node is a plain single-process run.
#
# Mesh: `--config.mesh.data=-1 --config.mesh.fsdp=<G>` is a typical choice: params and optimizer
# state split (FSDP) over the G GPUs of a node, data parallel across nodes. The global
# --config.batch_size must divide by N x G.
#
# The workdir must be on a filesystem that all nodes share: orbax writes each checkpoint
# cooperatively from all processes, and a resumed run reads it back the same way. Re-submitting
# the same command resumes from the last checkpoint.
#
# Environment: XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90 here) and JAX_LOCAL_DEVICE_IDS
# (default: all the node's GPUs) may be set before sbatch to override.
#
# Time limits and preemption: SLURM sends this batch shell SIGUSR1 120 s before the time limit
# (`--signal=B:USR1@120`; also at preemption where PreemptParameters=send_user_signal). The trap
# below passes one SIGTERM through srun to every medjax process; they agree on a step, save it,
# and exit 0 ("preempted"). The script then requeues the job (`--requeue`, `scontrol requeue`)
# and exits 0; the requeued job reruns this script, which resumes from that checkpoint
# (`--open-mode=append` keeps one log). A SIGTERM that SLURM sends the whole job itself (e.g.
# preemption without send_user_signal) reaches the medjax processes directly; the trap then
# only waits for them and requeues, adding no second SIGTERM (which would stop them unsaved).
#SBATCH --job-name=medjax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: sbatch [--nodes=N] launch/slurm_multi_gpu.sh --config=configs/<name>.py[:arg]" \
       "--workdir=/shared/DIR [--config.key=value ...]" >&2
  exit 2
fi

# Let XLA preallocate this fraction of each GPU (its default, 0.75, wastes memory on big runs).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# With one task per node, JAX's SLURM detection would give each process only the GPU numbered
# SLURM_LOCALID (0); list all of the node's GPUs instead.
GPUS="${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
if [ "${GPUS:-0}" -gt 0 ] && [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi

MODULE="${MEDJAX_MODULE:-medjax.train}"
case "$MODULE" in
  medjax.train|medjax.evaluate|medjax.export) ;;
  *) echo "MEDJAX_MODULE=$MODULE: expected medjax.train, medjax.evaluate or medjax.export" >&2
     exit 2 ;;
esac
echo "medjax: ${SLURM_JOB_NUM_NODES:-1} node(s) x ${GPUS} GPU(s)" \
     "(restart ${SLURM_RESTART_COUNT:-0}); python -m $MODULE $*"

STOPPING=""
SRUN_PID=""
on_early_signal() {  # SIGUSR1 from --signal: ask every process to save and stop, once
  if [ -z "$STOPPING" ] && [ -n "$SRUN_PID" ]; then
    echo "medjax: time limit or preemption near: SIGTERM to the run (it saves, then stops)"
    kill -TERM "$SRUN_PID" 2>/dev/null || true  # srun passes it to every task on every node
  fi
  STOPPING=1
}
on_sigterm() {  # SLURM signalled the whole job: the tasks have their SIGTERM already
  echo "medjax: SIGTERM to the job: waiting for the run to save"
  STOPPING=1
}
trap on_early_signal USR1
trap on_sigterm TERM

# srun in the background so that the traps run while it works; `wait` returns early (> 128)
# when a trap ran, so wait again until srun itself has ended.
srun --kill-on-bad-exit=1 python -m "$MODULE" "$@" &
SRUN_PID=$!
set +e
while kill -0 "$SRUN_PID" 2>/dev/null; do
  wait "$SRUN_PID"
done
wait "$SRUN_PID"  # bash keeps the status of an ended child: srun's own exit code
RC=$?
set -e

if [ -n "$STOPPING" ]; then
  if [ "$RC" -ne 0 ]; then
    echo "medjax: the run exited with $RC while stopping; not requeued" >&2
    exit "$RC"
  fi
  echo "medjax: stopped at a checkpoint; requeueing job ${SLURM_JOB_ID:-?} to resume"
  scontrol requeue "${SLURM_JOB_ID:-}" \
      || echo "medjax: scontrol requeue failed; submit the same command again to resume" >&2
  exit 0
fi
exit "$RC"
