#!/usr/bin/env bash
# ResNet-50 v1.5 on one GPU (or on the CPU where there is none). Extra arguments pass through,
# e.g. --epochs 2 --data-backend dali-cpu --profile 250e.
# A machine with an NVIDIA driver trains on CUDA or stops saying why (e.g. a driver too old for this torch build),
# never silently on the CPU; a CPU-only machine runs on the CPU. A later --device in "$@" wins.
device=auto; [[ -e /proc/driver/nvidia/version || -e /dev/nvidia0 ]] && device=cuda
exec "$(dirname "$0")/../common/launch.sh" 1 train --device "$device" --preset "$(dirname "$0")/preset.toml" "$@"
