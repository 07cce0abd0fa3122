#!/usr/bin/env bash
# MobileNet v1 on several nodes: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT from the environment
# (Slurm, Kubernetes), NPROC_PER_NODE processes per node (default 8). Extra arguments pass through.
exec "$(dirname "$0")/../common/launch.sh" "${NPROC_PER_NODE:-8}" train --preset "$(dirname "$0")/preset.toml" "$@"
