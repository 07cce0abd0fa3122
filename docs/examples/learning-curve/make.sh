#!/usr/bin/env bash
# The README's own-data walk on real images: a raw folder of Fashion-MNIST PNGs (300 per class, one sub-folder
# per class, nobody prepared it), `convnets prepare folder`, then `convnets learning-curve` with ResNet-18's
# Fashion-MNIST profile (32 px) at batch 32, 5 epochs per point. CPU-only; the figures it writes are this folder's files.
# Usage: bash docs/examples/learning-curve/make.sh [WORK_DIR]   (about 5 minutes on 2 quiet cores)
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}
WORK=${1:-runs/learning-curve-example}
HERE=docs/examples/learning-curve
rm -rf "$WORK"  # a fresh curve: --resume auto would continue an earlier one
"$PY" - "$WORK/raw" <<'PY'
import gzip, sys
from pathlib import Path
import numpy as np
from PIL import Image
src = Path("/usr/share/datasets/fashion-mnist")
if not src.is_dir():
    sys.exit("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
images = np.frombuffer(gzip.open(src / "train-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
labels = np.frombuffer(gzip.open(src / "train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
rng = np.random.default_rng(0)
for c, name in enumerate(names):
    folder = Path(sys.argv[1]) / name
    folder.mkdir(parents=True)
    for i in rng.choice(np.flatnonzero(labels == c), 300, replace=False):
        Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
PY
"$PY" -m common prepare folder --src "$WORK/raw" --out "$WORK/data" --val-fraction 0.2 --seed 0
"$PY" -m common learning-curve --preset resnet50/preset.toml --profile fashion-mnist --data "$WORK/data" \
    --output "$WORK/curve" --epochs 5 --batch-size 32 --fractions 0.1,0.25,0.5,1.0
cp "$WORK/curve/learning_curve.md" "$WORK/curve/learning_curve.png" "$WORK/curve/learning_curve.json" "$HERE/"
