#!/usr/bin/env bash
# Throughput sweep (batch sizes x precisions, train and inference) written under benchmarks/results/<device>/.
# Environment: ARCH (default vgg16), BATCH_SIZES, PRECISIONS, MODES; extra arguments pass to `convnets benchmark`.
# Heavy: VGG-16 costs 15.5 G multiply-adds per 224x224 image, 3.8x ResNet-50 (NOTE, shown with --help).
export RECIPE_NOTE="$(cat "$(dirname "$0")/NOTE")"  # shown above --help
# A machine with an NVIDIA driver trains on CUDA or stops saying why (e.g. a driver too old for this torch build),
# never silently on the CPU; a CPU-only machine runs on the CPU. A later --device in "$@" wins.
device=auto; [[ -e /proc/driver/nvidia/version || -e /dev/nvidia0 ]] && device=cuda
exec "$(dirname "$0")/../common/benchmark_sweep.sh" "${ARCH:-vgg16}" --device "$device" "$@"
