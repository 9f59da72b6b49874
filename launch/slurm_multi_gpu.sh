#!/bin/bash
# One medjax training run on N nodes x G GPUs under SLURM.
#
#   sbatch --nodes=2 launch/slurm_multi_gpu.sh --config=configs/cxr_unet.py:paper \
#       --workdir=/shared/runs/x [--config.key=value ...]
#   sbatch --nodes=4 --gpus-per-node=4 --partition=gpu --time=48:00:00 launch/slurm_multi_gpu.sh ...
#
# Everything after the script name goes to `python -m medjax.train` unchanged. Submit from the
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
#SBATCH --job-name=medjax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=slurm-%j.out
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

echo "medjax: ${SLURM_JOB_NUM_NODES:-1} node(s) x ${GPUS} GPU(s); python -m medjax.train $*"
srun --kill-on-bad-exit=1 python -m medjax.train "$@"
