#!/usr/bin/env bash
# MobileNet v1 on one GPU (or on the CPU where there is none); --profile mobilenet_v2, mobilenet_v3_large or
# fashion-mnist picks another recipe of preset.toml. Extra arguments pass through, e.g. --width-mult 0.5
# --image-size 160, or --optimizer-batch-size 256 to accumulate to the recipe's global batch of 256.
# A machine with an NVIDIA driver trains on CUDA or stops saying why (e.g. a driver too old for this torch build),
# never silently on the CPU; a CPU-only machine runs on the CPU. A later --device in "$@" wins.
device=auto; [[ -e /proc/driver/nvidia/version || -e /dev/nvidia0 ]] && device=cuda
exec "$(dirname "$0")/../common/launch.sh" 1 train --device "$device" --preset "$(dirname "$0")/preset.toml" "$@"
