#!/usr/bin/env bash
# Throughput sweep (batch sizes x precisions, train and inference) written under benchmarks/results/<device>/.
# Environment: BATCH_SIZES, PRECISIONS, MODES; extra arguments pass to `convnets benchmark`.
exec "$(dirname "$0")/../common/benchmark_sweep.sh" "${ARCH:-resnet50}" "$@"
