"""Random images already on the device: measures the model and the loop with no input pipeline."""

from __future__ import annotations

import torch

from common.data.spec import Loader, PipelineSpec


class SyntheticLoader(Loader):
    """The same random batch every step, ``n_batches`` per epoch."""

    def __init__(self, spec: PipelineSpec, num_classes: int, n_batches: int, device, multilabel: bool = False):
        super().__init__(n_batches)
        g = torch.Generator(device="cpu").manual_seed(spec.seed)
        memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        shape = (spec.batch_size, 3, spec.image_size, spec.image_size)
        images = torch.randn(shape, generator=g).to(device, spec.dtype)
        self.images = images.contiguous(memory_format=memory_format)
        if multilabel:  # a random set of classes per image
            self.labels = torch.randint(0, 2, (spec.batch_size, num_classes), generator=g).float().to(device)
        else:
            self.labels = torch.randint(0, num_classes, (spec.batch_size,), generator=g).to(device)

    def __iter__(self):
        for _ in range(self.n_batches):
            yield self.images, self.labels
