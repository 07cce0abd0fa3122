#!/usr/bin/env bash
# Every export format's speed and top-1 (`convnets benchmark --mode formats`) for three models trained on
# Fashion-MNIST at 32 px: ResNet-18, MobileNet v2 and VGG-11 with batch norm; then the report.
#   bash benchmarks/formats_fashion_mnist.sh [convnets benchmark options, e.g. --iterations 50]
# Each model is trained briefly unless CHECKPOINTS/<arch>/best.pt exists (then it is reused): one epoch cut to the
# steps of 128 images listed below (200: 25,600 of the 60,000 training images; VGG-11, half as fast to train on a
# CPU, 100), with its recipe's Fashion-MNIST profile. Results: RESULTS/formats_<arch>.json. Settings (environment):
#   DATA=data/fashion-mnist CHECKPOINTS=runs/formats ARCHS="resnet18 mobilenet_v2 vgg11_bn" TRAIN_STEPS (all models)
#   BATCH_SIZES=1,8,64 RESULTS=benchmarks/results/<device> REPORT=1 (0: skip python -m benchmarks.report) TRAIN_ARGS=
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common/python.sh"
cd "$root"
for arg in "$@"; do
  if [[ "$arg" == -h || "$arg" == --help ]]; then sed -n '2,9p' "${BASH_SOURCE[0]}" | cut -c3-; exit 0; fi
done
DATA="${DATA:-data/fashion-mnist}"
CHECKPOINTS="${CHECKPOINTS:-runs/formats}"
ARCHS="${ARCHS:-resnet18 mobilenet_v2 vgg11_bn}"
BATCH_SIZES="${BATCH_SIZES:-1,8,64}"
if [[ -z "${RESULTS:-}" ]]; then
  RESULTS="benchmarks/results/$("$PYTHON" -c 'from benchmarks.environment import device_slug
from common.distributed import resolve_device
print(device_slug(resolve_device("auto")))')"
fi

# arch, the recipe launcher and profile it trains with (the recipes' own Fashion-MNIST settings at 32 px), steps,
# then options of its own. MobileNet v2 borrows v1's profile at a fifth of its lr: at v1's 0.5 per 256 its training
# loss was above chance after 100 steps (2.69, 50.8% top-1 after 200); at 0.1, 1.05.
RECIPES="resnet18 resnet50/train_1gpu.sh fashion-mnist 200
mobilenet_v2 mobilenet/train_1gpu.sh fashion-mnist 200 --lr 0.1
vgg11_bn vgg/train_1gpu.sh fashion-mnist 100"

read -r -a train_args <<<"${TRAIN_ARGS:-}"  # more training options, e.g. TRAIN_ARGS="--workers 1"
for arch in $ARCHS; do
  read -r _ launcher profile steps own < <(grep "^$arch " <<<"$RECIPES") \
    || { echo "no recipe line for $arch in $0" >&2; exit 2; }
  read -r -a own_args <<<"${own:-}"
  checkpoint="$CHECKPOINTS/$arch/best.pt"
  if [[ -f "$checkpoint" ]]; then
    echo "reusing $checkpoint (remove it to train again)"
  else
    bash "$launcher" --profile "$profile" --arch "$arch" --data "$DATA" --output "$CHECKPOINTS/$arch" --epochs 1 \
      --max-steps-per-epoch "${TRAIN_STEPS:-$steps}" "${own_args[@]}" "${train_args[@]}"
  fi
  "$PYTHON" -m common benchmark --mode formats --checkpoint "$checkpoint" --data "$DATA" \
    --batch-sizes "$BATCH_SIZES" --json "$RESULTS/formats_$arch.json" "$@"
done
if [[ "${REPORT:-1}" == 1 ]]; then "$PYTHON" -m benchmarks.report; fi
