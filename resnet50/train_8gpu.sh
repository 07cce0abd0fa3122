#!/usr/bin/env bash
# ResNet-50 v1.5 on 8 GPUs of one node (torchrun, one process per GPU; gloo on a CPU-only machine).
# 256 images per GPU, lr 0.256 per 256 images: 2.048 at this global batch. Extra arguments pass through.
exec "$(dirname "$0")/../common/launch.sh" 8 train --preset "$(dirname "$0")/preset.toml" "$@"
