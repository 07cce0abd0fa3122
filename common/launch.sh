#!/usr/bin/env bash
# The one launcher behind every recipe script: a single process, or torchrun for several processes and nodes.
#   common/launch.sh PROCS SUBCOMMAND [ARGS...]
# PROCS is the number of processes on this node (one per GPU; on a CPU-only machine they share the cores
# and talk over gloo). Several nodes: set NNODES, MASTER_ADDR, MASTER_PORT (and RDZV_ID, MAX_RESTARTS), as
# common/slurm.sh or the Helm chart do. The interpreter: see python.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
procs="${1:?usage: common/launch.sh PROCS SUBCOMMAND [ARGS...]}"
shift
help=0
for arg in "$@"; do [[ "$arg" == -h || "$arg" == --help ]] && help=1; done
# A recipe can set RECIPE_NOTE (costs, caveats) to be shown above the engine's --help.
if [[ -n "${RECIPE_NOTE:-}" && "$help" == 1 ]]; then printf '%s\n\n' "$RECIPE_NOTE"; fi
nnodes="${NNODES:-1}"
# Several processes on a machine without an NVIDIA driver (the probe the recipe launchers use) would otherwise
# start quietly on the CPU: say so once, with the way out. --help starts no training, so it gets no line.
if [[ "$procs" != 1 && "$help" == 0 && ! -e /proc/driver/nvidia/version && ! -e /dev/nvidia0 ]]; then
  echo "launch.sh: no NVIDIA GPU found (no /proc/driver/nvidia/version or /dev/nvidia0): starting $procs" \
    "processes on the CPU instead, sharing its $(nproc 2>/dev/null || echo '?') cores over gloo;" \
    "for one process use the recipe's train_1gpu.sh (or common/launch.sh 1 ...); in a container, pass the GPUs" \
    "in (docker run --gpus all)" >&2
fi
if [[ "$procs" == 1 && "$nnodes" == 1 ]]; then
  exec "$PYTHON" -m common "$@"
fi
if [[ "$nnodes" == 1 ]]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$procs" -m common "$@"
fi
# Several nodes: torchrun's c10d rendezvous, hosted by the torchrun on MASTER_ADDR (Slurm's first node, the
# Kubernetes Job's pod 0). Ranks come from the rendezvous, so NODE_RANK is not needed and a restarted node
# rejoins; MAX_RESTARTS lets the surviving agents restart their workers instead of failing the whole job.
: "${MASTER_ADDR:?MASTER_ADDR must be set for a multi-node run}"
# A restarted node must be able to rejoin: with the agent's store shared with the workers (torch's default since
# 2.5), a surviving rank-0 agent does not publish the new round's MASTER_ADDR, and the new node waits for it until
# it times out (pytorch/pytorch#135712; seen with torch 2.14 in tests/test_two_nodes.py). Each round then
# bootstraps its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$procs" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-convnets}" \
  --max-restarts "${MAX_RESTARTS:-0}" -m common "$@"
