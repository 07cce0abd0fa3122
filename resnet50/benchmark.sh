#!/usr/bin/env bash
# Throughput sweep (batch sizes x precisions, train and inference) written under benchmarks/results/<device>/.
# Environment: BATCH_SIZES, PRECISIONS, MODES; extra arguments pass to `convnets benchmark`.
# A machine with an NVIDIA driver trains on CUDA or stops saying why (e.g. a driver too old for this torch build),
# never silently on the CPU; a CPU-only machine runs on the CPU. A later --device in "$@" wins.
device=auto; [[ -e /proc/driver/nvidia/version || -e /dev/nvidia0 ]] && device=cuda
exec "$(dirname "$0")/../common/benchmark_sweep.sh" "${ARCH:-resnet50}" --device "$device" "$@"
