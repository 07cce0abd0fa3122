#!/usr/bin/env bash
# VGG-16 on one GPU (or on the CPU where there is none); --profile vgg16_bn or fashion-mnist picks another recipe
# of preset.toml. Extra arguments pass through, e.g. --arch vgg19 --optimizer-batch-size 256.
# Heavy: VGG-16 has 138.4M parameters and costs 15.5 G multiply-adds per 224x224 image, 3.8x ResNet-50 (note below).
export RECIPE_NOTE="$(cat "$(dirname "$0")/NOTE")"  # shown above --help
# A machine with an NVIDIA driver trains on CUDA or stops saying why (e.g. a driver too old for this torch build),
# never silently on the CPU; a CPU-only machine runs on the CPU. A later --device in "$@" wins.
device=auto; [[ -e /proc/driver/nvidia/version || -e /dev/nvidia0 ]] && device=cuda
exec "$(dirname "$0")/../common/launch.sh" 1 train --device "$device" --preset "$(dirname "$0")/preset.toml" "$@"
