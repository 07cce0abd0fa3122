#!/usr/bin/env bash
# ResNet-50 v1.5 on 8 GPUs of one node (torchrun, one process per GPU; gloo on a CPU-only machine).
# 256 images per GPU, lr 0.256 per 256 images: 2.048 at this global batch. Extra arguments pass through.
# A machine with an NVIDIA driver trains on CUDA or stops saying why (e.g. a driver too old for this torch build),
# never silently on the CPU; a CPU-only machine runs on the CPU. A later --device in "$@" wins.
device=auto; [[ -e /proc/driver/nvidia/version || -e /dev/nvidia0 ]] && device=cuda
exec "$(dirname "$0")/../common/launch.sh" 8 train --device "$device" --preset "$(dirname "$0")/preset.toml" "$@"
