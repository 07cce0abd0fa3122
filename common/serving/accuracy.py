"""Top-1 of any runtime that maps a normalised batch to class probabilities (ONNX Runtime, TensorRT, a torch
module), on a labelled folder preprocessed as ``evaluate`` preprocesses it, and counted by ``evaluate`` itself.
The INT8 export's accuracy check and the formats benchmark both measure through here, so that every figure they
print comes from the same images, the same pixels and the same counting."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.data import ImageList, PipelineSpec, build_loader, scan_split
from common.errors import UserError
from common.evaluation import EvalResult, evaluate
from common.serving.metadata import ModelMetadata

log = logging.getLogger("convnets")

Predict = Callable[[torch.Tensor], "np.ndarray | torch.Tensor"]


def split_folder(root: str | Path, split: str) -> Path:
    """``root/split`` when it exists (an ImageFolder root), else ``root`` itself (a split folder given directly)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    return root / split if (root / split).is_dir() else root


def labelled_images(root: str | Path, meta: ModelMetadata) -> ImageList:
    """The validation images below ``root`` (``root/val`` or ``root`` itself), labelled against the model's classes."""
    images = scan_split(split_folder(root, "val"), classes=meta.classes)
    if images.multilabel:
        raise UserError(f"{images.root} is multi-label (labels.csv): top-1 is measured on single-label class folders")
    if not len(images):
        raise UserError(f"{images.root} holds no image of the model's classes ({', '.join(meta.classes[:10])})")
    return images


def eval_loader(images: ImageList, meta: ModelMetadata, batch_size: int = 64, workers: int = 0):
    """``evaluate``'s pipeline on the pytorch backend (decode with PIL, resize the shorter side to
    ``resize_size``, center crop ``image_size``, normalise), on the CPU, in file order: float32 NCHW batches."""
    spec = PipelineSpec(image_size=meta.image_size, resize_size=meta.resize_size, batch_size=batch_size,
                        workers=workers)  # fmt: skip
    return build_loader("pytorch", images, spec, train=False, device=torch.device("cpu"))


class AsLogits(torch.nn.Module):
    """A runtime that returns probabilities, seen by ``evaluate`` as a classifier that returns logits: the log of a
    softmax is its logits less a constant per row, so the top-k and the cross-entropy ``evaluate`` computes are
    those of the original logits."""

    def __init__(self, predict: Predict):
        super().__init__()
        self.predict = predict

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = self.predict(images)
        if isinstance(probabilities, np.ndarray):
            probabilities = torch.from_numpy(probabilities)
        # An INT8 graph can round a tiny probability to 0: floor it so that the loss stays finite.
        return probabilities.float().cpu().clamp_min(1e-30).log()


def top1(predict: Predict, loader, meta: ModelMetadata) -> EvalResult:
    """``evaluate``'s top-1 (and top-5, loss, confusion) of ``predict`` over ``loader``'s batches."""
    return evaluate(AsLogits(predict), loader, len(meta.classes))
