#!/usr/bin/env bash
# Throughput sweep (batch sizes x precisions, train and inference) written under benchmarks/results/<device>/.
# Environment: ARCH (default vgg16), BATCH_SIZES, PRECISIONS, MODES; extra arguments pass to `convnets benchmark`.
# Heavy: VGG-16 costs 15.5 G multiply-adds per 224x224 image, 3.8x ResNet-50 (NOTE, shown with --help).
export RECIPE_NOTE="$(cat "$(dirname "$0")/NOTE")"  # shown above --help
exec "$(dirname "$0")/../common/benchmark_sweep.sh" "${ARCH:-vgg16}" "$@"
