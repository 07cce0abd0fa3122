#!/usr/bin/env bash
# Classify images with a trained checkpoint: infer.sh --checkpoint runs/resnet50/best.pt IMAGES... [--csv]
exec "$(dirname "$0")/../common/launch.sh" 1 predict "$@"
