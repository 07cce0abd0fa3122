"""``convnets augment-preview``: a grid of augmented training samples, to look at before a long run."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import torch

from common.config import AugmentPreviewConfig
from common.errors import UserError

log = logging.getLogger("convnets")


def augment_grid(cfg: AugmentPreviewConfig) -> torch.Tensor:
    """A uint8 CHW grid: one row per training image (spread over the classes), its eval view first, then
    ``cfg.samples`` augmented versions (epochs 0, 1, ...) exactly as the pytorch backend draws them."""
    from torchvision.utils import make_grid

    from common.data import PipelineSpec, eval_transform, load_rgb, scan_split
    from common.data.pytorch_loader import TrainTransform
    from common.data.spec import Augmentation

    root = Path(cfg.data)
    split = root / "train" if (root / "train").is_dir() else root
    if not split.is_dir():
        raise UserError(f"--data {cfg.data}: no such folder")
    images = scan_split(split)
    rng = np.random.default_rng(cfg.seed)
    # Round-robin over the classes, so that a skewed data set still shows every class it can.
    by_class = [rng.permutation(np.flatnonzero(np.asarray(images.labels) == c)) for c in range(len(images.classes))]
    picks = [int(ix[i]) for i in range(max(map(len, by_class))) for ix in by_class if i < len(ix)][: cfg.images]
    augment = Augmentation(**{f: getattr(cfg, f) for f in Augmentation.__dataclass_fields__})
    spec = PipelineSpec(cfg.image_size, int(round(cfg.image_size / 0.875)), cfg.min_crop_scale, seed=cfg.seed,
                        augment=augment)  # fmt: skip
    train, center = TrainTransform(spec), eval_transform(spec)
    tiles = []
    for index in picks:
        image = load_rgb(images.files[index])
        tiles.append(center(image))
        tiles += [train(image, epoch, index) for epoch in range(cfg.samples)]
    return make_grid(torch.stack(tiles), nrow=cfg.samples + 1, padding=2, pad_value=255)


def write_augment_preview(cfg: AugmentPreviewConfig) -> Path:
    """Write :func:`augment_grid` as a PNG, atomically (temporary file, then rename)."""
    from PIL import Image

    grid = augment_grid(cfg)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG", optimize=True)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out)
    log.info("wrote %s: %d row(s) of an eval view and %d augmented samples", out,
             grid.shape[1] // (cfg.image_size + 2), cfg.samples)  # fmt: skip
    return out
