"""Parameter and multiply-add counts, measured with ``torch.utils.flop_counter`` rather than by hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.registry import create_model, get_model_spec, list_models


@dataclass(frozen=True)
class ModelCounts:
    arch: str
    image_size: int
    num_classes: int
    width_mult: float | None
    params: int
    macs: int

    def as_dict(self) -> dict:
        return {
            "arch": self.arch,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "width_mult": self.width_mult,
            "params": self.params,
            "macs": self.macs,
            "params_m": round(self.params / 1e6, 3),
            "gmacs": round(self.macs / 1e9, 3),
        }


def count_model(
    arch: str, image_size: int | None = None, num_classes: int = 1000, width_mult: float | None = None
) -> ModelCounts:
    """Count parameters and multiply-adds of one forward pass of a single image.

    The model is built on the meta device, so even VGG-19 costs no memory and no arithmetic: the counter
    sees the shapes of every convolution and matmul, which is all it needs. The flop counter reports
    2 FLOPs per multiply-add (convolutions and matmuls only, as the papers count them), so MACs = FLOPs / 2.
    """
    spec = get_model_spec(arch)
    size = image_size or spec.image_size
    with torch.device("meta"):
        model = create_model(arch, num_classes=num_classes, width_mult=width_mult).eval()
        x = torch.empty(1, 3, size, size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return ModelCounts(arch, size, num_classes, width_mult, params, counter.get_total_flops() // 2)


def count_all(image_size: int = 224) -> list[ModelCounts]:
    """Counts for every registered model at ``image_size`` (for ``info --list``)."""
    return [count_model(name, image_size=image_size) for name in list_models()]
