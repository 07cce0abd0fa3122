#!/usr/bin/env bash
# ResNet-50 v1.5 on one GPU (or on the CPU where there is none). Extra arguments pass through,
# e.g. --epochs 2 --data-backend dali-cpu --profile 250e.
exec "$(dirname "$0")/../common/launch.sh" 1 train --preset "$(dirname "$0")/preset.toml" "$@"
