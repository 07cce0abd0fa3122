"""The pytorch backend: PIL decoding in DataLoader workers, torchvision's functional transforms, pinned memory and
(on GPU) a side stream that copies the next batch while the current one computes."""

from __future__ import annotations

import numpy as np
import torch

from common.data.folders import ImageList
from common.data.sampling import ShardIndices, extra_draws, shard_indices, train_augmentation
from common.data.spec import IMAGENET_MEAN, Augmentation, Loader, Normalizer, PipelineSpec, as_targets
from common.errors import UserError


def eval_transform(spec: PipelineSpec):
    """Resize the shorter side, then center crop (the same for the loaders and for ``predict``)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(spec.resize_size, antialias=True), v2.CenterCrop(spec.image_size)])


def random_transforms(augment: Augmentation):
    """torchvision v2 transforms for the options beyond crop and flips (None when there are none), on uint8 CHW.

    Random erasing runs here, before normalisation, filling with the ImageNet mean colour: the same as erasing
    to 0 after normalising, as torchvision's recipes do.
    """
    from torchvision.transforms import v2

    transforms = []
    if augment.auto_augment == "autoaugment":
        transforms.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    elif augment.auto_augment == "randaugment":
        transforms.append(v2.RandAugment())
    elif augment.auto_augment == "trivialaugment":
        transforms.append(v2.TrivialAugmentWide())
    if augment.rotation:
        transforms.append(v2.RandomRotation(augment.rotation))
    if augment.color_jitter:
        s = augment.color_jitter
        transforms.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    if augment.random_erasing:
        fill = [round(m * 255) for m in IMAGENET_MEAN]
        transforms.append(v2.RandomErasing(p=augment.random_erasing, value=fill))
    return v2.Compose(transforms) if transforms else None


class TrainTransform:
    """RandomResizedCrop + flips with the crop window and flips drawn from (seed, epoch, index) by the same
    counter-based uniforms as the DALI backends, so both take the same region of the same image; then the
    random transforms of :func:`random_transforms`, under a torch seed drawn from (seed, epoch, index) too, so
    that they also replay exactly after a resume, whichever worker decodes the image."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self.random = random_transforms(spec.augment)

    def __call__(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        spec, augment = self.spec, self.spec.augment
        height, width = image.shape[-2:]
        (x, y, w, h), flip = train_augmentation(spec.seed, epoch, index, (width, height), spec.min_crop_scale)
        top, left = round(y * height), round(x * width)
        size = [spec.image_size, spec.image_size]
        image = F.resized_crop(image, top, left, round(h * height), round(w * width), size, antialias=True)
        if flip and augment.hflip:
            image = F.hflip(image)
        if augment.vflip or self.random is not None:
            vflips, seeds = extra_draws(spec.seed, epoch, np.array([index]))
            if vflips[0] and augment.vflip:
                image = F.vflip(image)
            if self.random is not None:
                # torchvision's random transforms draw from torch's global generator: seed it for this image,
                # and leave the worker's generator as it was.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seeds[0]))
                    image = self.random(image)
        return image


def load_rgb(path: str) -> torch.Tensor:
    """Any PIL-readable image as uint8 RGB CHW (see ``common.images.open_rgb``: EXIF orientation, 16-bit and float
    modes scaled as DALI's decoders do)."""
    from torchvision.transforms.v2 import functional as F

    from common.images import open_rgb

    return F.pil_to_tensor(open_rgb(path))


class BadImageError(UserError):
    """A file the loader cannot decode, named by path (raised in DataLoader workers, re-raised here)."""


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes with PIL (every mode becomes RGB); training crops come from :class:`TrainTransform`."""

    def __init__(self, images: ImageList, spec: PipelineSpec, train: bool):
        self.files, self.labels = images.files, images.labels
        self.train_transform = TrainTransform(spec) if train else None
        self.eval_transform = None if train else eval_transform(spec)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        try:
            image = load_rgb(self.files[index])
        except Exception as e:  # noqa: BLE001 - any decoder failure: name the file instead of a worker traceback
            raise BadImageError(f"cannot decode {self.files[index]} ({type(e).__name__}: {e})") from None
        if self.train_transform is not None:
            image = self.train_transform(image, epoch, index)
        else:
            image = self.eval_transform(image)
        return image, self.labels[index]


class _EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, epoch)`` so persistent workers learn the epoch without being restarted."""

    def __init__(self, indices_for_epoch: ShardIndices):
        self.indices_for_epoch, self.epoch = indices_for_epoch, 0

    def __iter__(self):
        return ((int(i), self.epoch) for i in self.indices_for_epoch(self.epoch))

    def __len__(self):
        return len(self.indices_for_epoch(self.epoch))


class PytorchLoader(Loader):
    """torch DataLoader workers, pinned memory, and (on GPU) a side stream that copies the next batch while
    the current one computes; normalisation happens on the device, where it is cheap."""

    def __init__(self, images: ImageList, spec: PipelineSpec, train: bool, device, rank: int, world: int):
        self.sampler = _EpochSampler(shard_indices(len(images), spec, train, rank, world))
        self.loader = torch.utils.data.DataLoader(
            _ImageDataset(images, spec, train),
            batch_size=spec.batch_size,
            sampler=self.sampler,
            num_workers=spec.workers,
            pin_memory=device.type == "cuda",
            drop_last=train,
            persistent_workers=spec.workers > 0,
            prefetch_factor=4 if spec.workers > 0 else None,
        )
        super().__init__(len(self.loader))
        self.device, self.multilabel = device, images.multilabel
        self.normalize = Normalizer(device, spec.channels_last, spec.dtype)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.epoch = epoch

    def _to_device(self, batch):
        images, labels = batch
        labels = as_targets(labels.to(self.device, non_blocking=True), self.multilabel)
        return self.normalize(images.to(self.device, non_blocking=True)), labels

    def _batches(self):
        """The DataLoader's batches; a worker's BadImageError arrives wrapped in its traceback: unwrap it."""
        try:
            yield from self.loader
        except BadImageError as e:
            lines = [line[line.index("cannot decode ") :] for line in str(e).splitlines() if "cannot decode " in line]
            message = lines[-1] if lines else str(e)
            raise BadImageError(f"{message}\nRun `convnets prepare --check DATA` to list every bad file.") from None

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self._batches():
                yield self._to_device(batch)
            return
        stream = torch.cuda.Stream()
        pending = None
        for batch in self._batches():
            with torch.cuda.stream(stream):
                ready = self._to_device(batch)
            if pending is not None:
                yield pending
            torch.cuda.current_stream().wait_stream(stream)
            for t in ready:
                t.record_stream(torch.cuda.current_stream())
            pending = ready
        if pending is not None:
            yield pending
