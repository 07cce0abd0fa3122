"""The contract every backend honours: what a loader is told (``PipelineSpec``) and what it yields.

Every backend yields ``(images, labels)`` on the training device: images normalised with the ImageNet mean and
std (float32, or float16 with ``half``), NCHW in the requested memory format; labels int64 class indices, or
float 0/1 targets of shape (batch, classes) for a multi-label split (:func:`as_targets`). Train:
RandomResizedCrop to ``image_size`` plus a horizontal flip. Eval: resize the shorter side to ``resize_size``,
center crop ``image_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation beyond RandomResizedCrop (see ``AugmentConfig``): flips on every image backend, the
    rest (a policy, rotation, colour jitter, random erasing) on the pytorch backend."""

    hflip: bool = True
    vflip: bool = False
    auto_augment: str | None = None
    rotation: float = 0.0
    color_jitter: float = 0.0
    random_erasing: float = 0.0

    def random_transforms(self) -> list[str]:
        """The options that need random transforms beyond crop and flips, as the command line spells them."""
        given = {"--auto-augment": self.auto_augment, "--rotation": self.rotation,
                 "--color-jitter": self.color_jitter, "--random-erasing": self.random_erasing}  # fmt: skip
        return [name for name, value in given.items() if value]


@dataclass(frozen=True)
class PipelineSpec:
    """What a backend needs to know about the images it produces.

    ``half`` makes the loaders yield float16 images (for fp16 AMP: the first convolution casts to fp16 anyway,
    and half the bytes cross PCIe and sit in the prefetch queues).
    """

    image_size: int
    resize_size: int
    min_crop_scale: float = 0.08
    batch_size: int = 256
    workers: int = 4
    channels_last: bool = False
    seed: int = 0
    half: bool = False
    augment: Augmentation = Augmentation()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32


class Normalizer:
    """uint8 NCHW -> normalised float in the requested memory format and dtype, on the training device."""

    def __init__(self, device: torch.device, channels_last: bool, dtype: torch.dtype = torch.float32):
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=self.memory_format).float()
        # Normalise in float32, then cast: fp16 would round the intermediate 0..255 values.
        return images.sub_(self.mean).div_(self.std).to(self.dtype)


class Loader:
    """Common face of the backends: ``set_epoch``, ``len`` (batches per epoch) and iteration."""

    def __init__(self, n_batches: int):
        self.n_batches, self.epoch = n_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


def as_targets(labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """A batch of labels as the loss takes them: int64 indices (batch,), or float targets (batch, classes)."""
    labels = labels.reshape(labels.shape[0], -1)
    return labels.float() if multilabel else labels.view(-1).long()
