#!/usr/bin/env bash
# MobileNet v1 on several nodes: NNODES, MASTER_ADDR, MASTER_PORT from the environment (c10d rendezvous; no NODE_RANK needed)
# (Slurm, Kubernetes), NPROC_PER_NODE processes per node (default 8). Extra arguments pass through.
# A machine with an NVIDIA driver trains on CUDA or stops saying why (e.g. a driver too old for this torch build),
# never silently on the CPU; a CPU-only machine runs on the CPU. A later --device in "$@" wins.
device=auto; [[ -e /proc/driver/nvidia/version || -e /dev/nvidia0 ]] && device=cuda
exec "$(dirname "$0")/../common/launch.sh" "${NPROC_PER_NODE:-8}" train --device "$device" --preset "$(dirname "$0")/preset.toml" "$@"
