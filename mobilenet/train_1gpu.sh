#!/usr/bin/env bash
# MobileNet v1 on one GPU (or on the CPU where there is none); --profile mobilenet_v2, mobilenet_v3_large or
# fashion-mnist picks another recipe of preset.toml. Extra arguments pass through, e.g. --width-mult 0.5
# --image-size 160, or --optimizer-batch-size 256 to accumulate to the recipe's global batch of 256.
exec "$(dirname "$0")/../common/launch.sh" 1 train --preset "$(dirname "$0")/preset.toml" "$@"
