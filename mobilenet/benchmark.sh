#!/usr/bin/env bash
# Throughput sweep (batch sizes x precisions, train and inference) written under benchmarks/results/<device>/.
# Environment: ARCH (default mobilenet_v1), BATCH_SIZES, PRECISIONS, MODES; extra arguments pass to
# `convnets benchmark`, e.g. --width-mult 0.5 --image-size 160.
exec "$(dirname "$0")/../common/benchmark_sweep.sh" "${ARCH:-mobilenet_v1}" "$@"
