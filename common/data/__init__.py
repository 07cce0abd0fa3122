"""Data: ImageFolder scanning, cached image checks, one determinism mechanism, and four backends behind one
contract (see :mod:`common.data.spec`).

- :mod:`~common.data.folders`: list a split's files, labels and classes.
- :mod:`~common.data.checks`: start-up checks of every file, their verdicts and sizes cached by (path, size, mtime).
- :mod:`~common.data.sampling`: shards, per-epoch order, and crop windows as pure functions of (seed, epoch, index).
- :mod:`~common.data.pytorch_loader`, :mod:`~common.data.dali_loader`, :mod:`~common.data.synthetic`: the backends.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.data.checks import (
    CheckCache,
    check_files,
    check_image,
    drop_bad_images,
    find_bad_images,
    format_bad,
    inspect_image,
)
from common.data.dali_decode import dali_reason, dali_undecodable
from common.data.folders import IMG_EXTENSIONS, ImageList, image_files, log_ignored, scan_split
from common.errors import UserError

if TYPE_CHECKING:
    import torch

    from common.config import TrainConfig
    from common.data.dali_loader import DaliLoader
    from common.data.pytorch_loader import BadImageError, PytorchLoader, eval_transform, load_rgb
    from common.data.sampling import (
        counter_uniforms,
        epoch_permutation,
        eval_shard,
        random_resized_crop_window,
        shard_indices,
        train_augmentation,
        train_shard,
    )
    from common.data.spec import IMAGENET_MEAN, IMAGENET_STD, Loader, Normalizer, PipelineSpec
    from common.data.synthetic import SyntheticLoader

# The loaders and what they share need torch; the checks and folder scans above do not, and `convnets prepare
# --check` must not pay torch's import (most of its start-up) for names it never uses. These are imported on
# first use instead (PEP 562); code in this package imports them from their modules.
_LAZY = {
    "DaliLoader": "dali_loader",
    **dict.fromkeys(("BadImageError", "PytorchLoader", "eval_transform", "load_rgb"), "pytorch_loader"),
    **dict.fromkeys(
        (
            "counter_uniforms",
            "epoch_permutation",
            "eval_shard",
            "random_resized_crop_window",
            "shard_indices",
            "train_augmentation",
            "train_shard",
        ),
        "sampling",
    ),  # fmt: skip
    **dict.fromkeys(("IMAGENET_MEAN", "IMAGENET_STD", "Loader", "Normalizer", "PipelineSpec"), "spec"),
    "SyntheticLoader": "synthetic",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # found directly from now on
    return value


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMG_EXTENSIONS", "BadImageError", "CheckCache", "DaliLoader", "DataBundle",
    "ImageList", "Loader", "Normalizer", "PipelineSpec", "PytorchLoader", "SyntheticLoader", "build_data",
    "build_loader", "check_files", "check_image", "counter_uniforms", "dali_reason", "dali_undecodable",
    "default_backend", "drop_bad_images", "epoch_permutation", "eval_shard", "eval_transform", "find_bad_images",
    "format_bad", "image_files", "inspect_image", "load_rgb", "log_ignored", "random_resized_crop_window",
    "scan_split", "shard_indices", "train_augmentation", "train_shard",
]  # fmt: skip


def default_backend(device: torch.device) -> str:
    return "dali-gpu" if device.type == "cuda" else "dali-cpu"


def build_loader(
    backend: str, images: ImageList, spec: PipelineSpec, train: bool, device, rank: int = 0, world: int = 1
) -> Loader:
    """The loader for one split on the chosen backend (``synthetic`` keeps the split's batch count)."""
    from common.data.dali_loader import DaliLoader
    from common.data.pytorch_loader import PytorchLoader
    from common.data.synthetic import SyntheticLoader

    if backend == "dali-gpu" and device.type != "cuda":
        raise UserError("--data-backend dali-gpu needs a GPU; use dali-cpu or pytorch on this machine")
    if backend in ("dali-gpu", "dali-cpu"):
        return DaliLoader(images, spec, train, backend == "dali-gpu", device, rank, world)
    if backend == "pytorch":
        return PytorchLoader(images, spec, train, device, rank, world)
    if backend == "synthetic":
        n = len(images) // (spec.batch_size * world) if train else -(-len(images) // (spec.batch_size * world))
        return SyntheticLoader(spec, len(images.classes), max(1, n), device, images.multilabel)
    raise UserError(f"unknown --data-backend {backend!r}")


@dataclass
class DataBundle:
    train: Loader
    val: Loader
    classes: list[str]
    class_counts: list[int] = dataclasses.field(default_factory=list)  # training images per class (--balance)
    multilabel: bool = False  # labels.csv splits: 0/1 targets per class, a sigmoid head
    train_images: int = 0


def build_data(cfg: TrainConfig, backend: str, spec: PipelineSpec, device, rank: int, world: int) -> DataBundle:
    """Scan DATA/train and DATA/val, drop or report bad files (keeping their sizes), and build both loaders."""
    from common import distributed as dist

    root = Path(cfg.data)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass --data DIR (an ImageFolder with train/ and val/)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(
                f"data folder {root} has no {split}/ folder (expected {root}/{split}/<class>/*); a folder "
                f"of class folders is split by: convnets prepare folder --src {root} --out DATA"
            )
    train_images = scan_split(root / "train")
    val_images = scan_split(root / "val", classes=train_images.classes)
    if train_images.multilabel != val_images.multilabel:
        multi, single = ("train", "val") if train_images.multilabel else ("val", "train")
        raise UserError(f"{root / multi} is multi-label (labels.csv) but {root / single} is not: use one layout")
    if backend != "synthetic":
        train_images, val_images = drop_bad_images(
            [train_images, val_images], cfg.image_check, cfg.skip_bad_images, cfg.workers,
            dali=backend.startswith("dali"), rank=rank, world=world, gather=dist.all_gather_object,
        )  # fmt: skip
    if len(train_images) < spec.batch_size * world:
        raise UserError(
            f"{root / 'train'} has {len(train_images)} images, fewer than one global batch "
            f"({spec.batch_size} x {world}); lower --batch-size"
        )
    val_spec = dataclasses.replace(spec, batch_size=min(spec.batch_size, max(1, len(val_images))))
    return DataBundle(
        train=build_loader(backend, train_images, spec, True, device, rank, world),
        val=build_loader(backend, val_images, val_spec, False, device, rank, world),
        classes=train_images.classes,
        class_counts=train_images.class_counts(),
        multilabel=train_images.multilabel,
        train_images=len(train_images),
    )
