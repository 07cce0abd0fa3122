#!/usr/bin/env bash
# MobileNet v1 on 8 GPUs of one node (torchrun, one process per GPU; gloo on a CPU-only machine).
# 32 images per GPU, lr 0.045 per 256 images: torchvision's MobileNetV2 recipe at its global batch of 256.
# --profile mobilenet_v3_large: 128 per GPU, RMSprop lr 0.064 at 1024. Extra arguments pass through.
exec "$(dirname "$0")/../common/launch.sh" 8 train --preset "$(dirname "$0")/preset.toml" "$@"
