#!/usr/bin/env bash
# Runs a recipe's train_multinode.sh on every node of a Slurm allocation: one task per node, each starting
# torchrun (common/launch.sh) with the c10d rendezvous on the allocation's first node.
#   common/slurm.sh RECIPE_SCRIPT [ARGS...]       (called from an sbatch script, e.g. resnet50/train_slurm.sbatch)
# Environment: NPROC_PER_NODE (default: the GPUs Slurm gave each node, else 8), MASTER_PORT (29500),
# MAX_RESTARTS (0). CONTAINER_IMAGE runs each task in that image through pyxis/enroot (srun --container-image),
# with CONTAINER_MOUNTS (e.g. /data:/data,/scratch/runs:/workspace/runs); the repository is then /workspace
# in the image, else the folder sbatch was called from.
set -euo pipefail
recipe="${1:?usage: common/slurm.sh RECIPE_SCRIPT [ARGS...], e.g. resnet50/train_multinode.sh}"
shift
: "${SLURM_JOB_ID:?common/slurm.sh runs inside a Slurm allocation (sbatch or salloc)}"
# The first hostname of the allocation hosts the rendezvous store; torchrun there recognises itself by name.
# (Read whole, not through `| head`: under pipefail an early-closed pipe fails the script.)
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR="${hosts[0]:?scontrol gave no hostnames for $SLURM_JOB_NODELIST}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-${gpus##*:}}"  # --gpus-per-node=a100:8 gives "a100:8"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="slurm-$SLURM_JOB_ID"
export MASTER_ADDR NNODES NPROC_PER_NODE MASTER_PORT RDZV_ID
echo "slurm.sh: $NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous at $MASTER_ADDR:$MASTER_PORT, $recipe"
container=()
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  container=(--container-image="$CONTAINER_IMAGE" --container-workdir=/workspace)
  if [[ -n "${CONTAINER_MOUNTS:-}" ]]; then container+=(--container-mounts="$CONTAINER_MOUNTS"); fi
else
  cd "${SLURM_SUBMIT_DIR:-.}"
fi
# One task per node; if one node's task fails, Slurm stops the others instead of leaving them waiting.
exec srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${container[@]}" bash "$recipe" "$@"
