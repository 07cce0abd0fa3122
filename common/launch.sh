#!/usr/bin/env bash
# The one launcher behind every recipe script: a single process, or torchrun for several processes and nodes.
#   common/launch.sh PROCS SUBCOMMAND [ARGS...]
# PROCS is the number of processes on this node (one per GPU; on a CPU-only machine they share the cores
# and talk over gloo). Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT, as Slurm or a
# Kubernetes job gives them. The interpreter: see python.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
procs="${1:?usage: common/launch.sh PROCS SUBCOMMAND [ARGS...]}"
shift
# A recipe can set RECIPE_NOTE (costs, caveats) to be shown above the engine's --help.
if [[ -n "${RECIPE_NOTE:-}" ]]; then
  for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then printf '%s\n\n' "$RECIPE_NOTE"; break; fi
  done
fi
nnodes="${NNODES:-1}"
if [[ "$procs" == 1 && "$nnodes" == 1 ]]; then
  exec "$PYTHON" -m common "$@"
fi
if [[ "$nnodes" == 1 ]]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$procs" -m common "$@"
fi
: "${NODE_RANK:?NODE_RANK must be set for a multi-node run}" "${MASTER_ADDR:?MASTER_ADDR must be set}"
exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --node-rank "$NODE_RANK" --nproc-per-node "$procs" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" -m common "$@"
