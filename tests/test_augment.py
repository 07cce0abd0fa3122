"""Augmentation per data set: flips on every image backend, torchvision's random transforms on the pytorch
backend as pure functions of (seed, epoch, index), a clear refusal on DALI, and the preview grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.data import PipelineSpec, build_loader, drop_bad_images, scan_split
from common.data.pytorch_loader import TrainTransform
from common.data.sampling import extra_draws
from common.data.spec import Augmentation
from common.errors import UserError
from tests.test_data_crops import write_rotated_photos

CPU = torch.device("cpu")
EVERYTHING = Augmentation(vflip=True, auto_augment="randaugment", rotation=20, color_jitter=0.4, random_erasing=0.5)


def photo(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, 48, 64), dtype=np.uint8))


def test_random_transforms_are_a_function_of_seed_epoch_and_index():
    transform = TrainTransform(PipelineSpec(image_size=32, resize_size=36, seed=5, augment=EVERYTHING))
    image = photo()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = transform(image, epoch=2, index=7)
    assert torch.equal(torch.random.get_rng_state(), before)  # the worker's own generator is left alone
    torch.manual_seed(999)  # another worker, another generator state: the same sample all the same
    assert torch.equal(transform(image, epoch=2, index=7), a)
    others = [transform(image, epoch=e, index=i) for e, i in ((3, 7), (2, 8))]
    assert not any(torch.equal(o, a) for o in others)
    plain = TrainTransform(PipelineSpec(image_size=32, resize_size=36, seed=5))(image, epoch=2, index=7)
    assert not torch.equal(plain, a)  # the options do something


def test_no_hflip_and_vflip_on_the_pytorch_backend():
    from torchvision.transforms.v2 import functional as F

    image = photo(1)
    base = PipelineSpec(image_size=32, resize_size=36, seed=2, augment=Augmentation(hflip=False))
    unflipped = TrainTransform(base)
    vertical = TrainTransform(dataclasses.replace(base, augment=Augmentation(hflip=False, vflip=True)))
    flipped = 0
    for index in range(16):
        crop = unflipped(image, 0, index)
        # Without --no-hflip, about half of these crops would be mirrored: a crop equal to its mirror never is.
        assert not torch.equal(crop, F.hflip(crop))
        draw = bool(extra_draws(2, 0, np.array([index]))[0][0])
        assert torch.equal(vertical(image, 0, index), F.vflip(crop) if draw else crop)
        flipped += draw
    assert 0 < flipped < 16


def test_dali_flips_as_the_pytorch_backend_and_refuses_the_rest(tmp_path):
    split = write_rotated_photos(tmp_path)
    (images,) = drop_bad_images([scan_split(split)], "header", skip_bad=False, workers=1)
    # Seed 0: of the 4 images, 2 have a horizontal flip drawn (which --no-hflip must skip), 3 a vertical one.
    spec = PipelineSpec(image_size=32, resize_size=36, batch_size=4, workers=1, min_crop_scale=0.1, seed=0,
                        augment=Augmentation(hflip=False, vflip=True))  # fmt: skip
    out = {}
    for backend in ("dali-cpu", "pytorch"):
        loader = build_loader(backend, images, spec, train=True, device=CPU)
        out[backend] = next(iter(loader))
    (xd, yd), (xt, yt) = out["dali-cpu"], out["pytorch"]
    assert torch.equal(yd, yt)
    # Same window and flips up to the decoders' IDCT and resize filters (see test_data_crops).
    assert (xd - xt).abs().mean(dim=(1, 2, 3)).max() < 0.1
    with pytest.raises(UserError, match="--rotation, --random-erasing: not available on the DALI backends"):
        build_loader("dali-cpu", images, dataclasses.replace(spec, augment=Augmentation(rotation=10,
                     random_erasing=0.2)), train=True, device=CPU)  # fmt: skip


def test_augment_preview_writes_a_grid(image_tree, tmp_path):
    from PIL import Image

    from common.config import AugmentPreviewConfig
    from common.preview import write_augment_preview

    cfg = AugmentPreviewConfig(data=str(image_tree), out=str(tmp_path / "grid.png"), image_size=32, images=3,
                               samples=4, auto_augment="trivialaugment")  # fmt: skip
    with Image.open(write_augment_preview(cfg)) as grid:
        # 3 rows of 1 eval view + 4 samples, 32 pixels each with make_grid's 2-pixel padding.
        assert grid.size == (2 + 5 * 34, 2 + 3 * 34)
        rows = np.asarray(grid.convert("RGB"))
    tiles = [rows[2 + 34 * r : 34 * (r + 1), 2 + 34 * c : 34 * (c + 1)] for r in range(3) for c in range(5)]
    assert len({t.tobytes() for t in tiles}) == 15  # no two samples alike
    assert not list(tmp_path.glob(".*.tmp"))
