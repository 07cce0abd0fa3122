"""The DALI backends: files read and crop windows drawn in DALI's Python worker processes (parallel external
source), decoding and augmentation in DALI's threads (``dali-cpu``) or on the GPU (``dali-gpu``).

The training thread only collects finished batches: reading 256 files and sampling 256 crop windows cost tens of
milliseconds per batch, which at thousands of images per second would be most of a step.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from common.data.checks import format_bad, inspect_image
from common.data.dali_decode import dali_reason, dali_undecodable, require_dali
from common.data.folders import ImageList
from common.data.sampling import ShardIndices, extra_draws, shard_indices, train_augmentations
from common.data.spec import IMAGENET_MEAN, IMAGENET_STD, Loader, PipelineSpec, as_targets
from common.errors import UserError

log = logging.getLogger(__name__)

# NVIDIA's settings for the mixed decoder on A100/H100 (DeepLearningExamples' ConvNets): share of the images
# sent to the hardware JPEG decoder, and buffers sized for ImageNet's largest images, allocated once up front.
HW_DECODER_LOAD = 0.65
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512
PREALLOCATE_WIDTH, PREALLOCATE_HEIGHT = 5980, 6430
# Batches that may be between the source and the iterator (the source's and the pipeline's prefetch queues):
# where to look for the file when a decode fails.
IN_FLIGHT = 6


class DaliBatchSource:
    """DALI's parallel ``external_source`` callback: one batch per call, a pure function of (seed, epoch, batch).

    Runs in DALI's worker processes (so it is pickled: plain data only), each worker on whole batches. DALI
    counts epochs from 0 for each pipeline; ``first_epoch`` maps them to training epochs. Training batches carry
    each image's crop window (in the displayed frame, from the start-up scan's sizes) and flip; raising
    StopIteration ends DALI's epoch, and the last batch of an eval epoch may be short.
    """

    def __init__(self, images: ImageList, spec: PipelineSpec, train: bool, indices: ShardIndices, first_epoch: int):
        self.files, self.labels, self.sizes = images.files, np.asarray(images.labels, np.int32), images.sizes
        self.seed, self.min_crop_scale, self.train = spec.seed, spec.min_crop_scale, train
        self.hflip, self.vflip = spec.augment.hflip, spec.augment.vflip
        self.batch_size, self.indices, self.first_epoch = spec.batch_size, indices, first_epoch
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:  # one permutation per worker per epoch
            self._order_epoch, self._order = epoch, self.indices(epoch)
        return self._order

    def size(self, index: int) -> tuple[int, int]:
        # Without a start-up scan (--image-check none) the header is read here, in a worker, once per epoch.
        return inspect_image(self.files[index], full=False)[1:]

    def read(self, index: int) -> np.ndarray:
        try:
            return np.fromfile(self.files[index], dtype=np.uint8)
        except OSError:
            # An empty buffer fails in DALI's decoder, whose error handling names the file and the reason
            # (an exception raised here would reach the user as a worker traceback).
            return np.zeros(0, np.uint8)

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        batch = self.order(epoch)[info.iteration * self.batch_size : (info.iteration + 1) * self.batch_size]
        if len(batch) == 0:
            raise StopIteration
        data = [self.read(i) for i in batch]
        labels = [self.labels[i : i + 1] for i in batch]
        if not self.train:
            return data, labels
        sizes = np.array([self.size(i) for i in batch]) if self.sizes is None else self.sizes[batch]
        windows, flips = train_augmentations(self.seed, epoch, batch, sizes, self.min_crop_scale)
        anchors, shapes = list(np.ascontiguousarray(windows[:, :2])), list(np.ascontiguousarray(windows[:, 2:]))
        mirrors = [np.array(flip and self.hflip, np.int32) for flip in flips]
        if not self.vflip:
            return data, labels, anchors, shapes, mirrors
        vflips = [np.array(v, np.int32) for v in extra_draws(self.seed, epoch, batch)[0]]
        return data, labels, anchors, shapes, mirrors, vflips


def _dali_pipeline(source: DaliBatchSource, train: bool, spec: PipelineSpec, gpu: bool, **pipeline_kwargs):
    """Build the DALI graph: one function for train and eval, as ``@pipeline_def`` intends."""
    dali = require_dali()
    fn, types = dali.fn, dali.types
    decoder_kwargs = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
    if gpu:
        decoder_kwargs.update(
            hw_decoder_load=HW_DECODER_LOAD,
            device_memory_padding=DEVICE_MEMORY_PADDING,
            host_memory_padding=HOST_MEMORY_PADDING,
            preallocate_width_hint=PREALLOCATE_WIDTH,
            preallocate_height_hint=PREALLOCATE_HEIGHT,
        )

    @dali.pipeline_def(**pipeline_kwargs)
    def pipeline():
        if train:
            vflip = spec.augment.vflip
            encoded, label, anchor, shape, mirror, *vertical = fn.external_source(
                source, num_outputs=6 if vflip else 5, batch=True, batch_info=True, parallel=True
            )
            # The window is in the displayed frame: DALI applies the EXIF orientation before it slices.
            images = fn.decoders.image_slice(encoded, anchor, shape, **decoder_kwargs)
            images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size, antialias=True)
            if vflip:  # crop_mirror_normalize mirrors horizontally only
                images = fn.flip(images, horizontal=0, vertical=vertical[0])
        else:
            encoded, label = fn.external_source(source, num_outputs=2, batch=True, batch_info=True, parallel=True)
            images = fn.decoders.image(encoded, **decoder_kwargs)
            images = fn.resize(images, resize_shorter=spec.resize_size, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT16 if spec.half else types.FLOAT,
            # HWC viewed as NCHW is channels_last in memory: the permute below is free.
            output_layout="HWC" if spec.channels_last else "CHW",
            crop=(spec.image_size, spec.image_size),
            mean=[m * 255 for m in IMAGENET_MEAN],
            std=[s * 255 for s in IMAGENET_STD],
            mirror=mirror,
        )
        return images, label

    return pipeline()


def reader_workers(workers: int) -> int:
    """DALI Python worker processes for reading files: a file read and a crop window cost far less than a
    decode, so a quarter of the decode threads (at least one, at most four) keep up."""
    return max(1, min(4, workers // 4))


class DaliLoader(Loader):
    """DALI decoders and augmentation; ``gpu`` uses the mixed (nvJPEG) decoder and GPU resizing.

    One pipeline lives for as long as epochs follow one another (building one per epoch leaks host memory inside
    DALI, about 12 MB an epoch, and restarts the worker processes). Its source decides the order and the random
    crops, so that they depend on (seed, epoch) alone and a resumed run replays them exactly; DALI's own reader
    and random operators carry state from epoch to epoch.
    """

    def __init__(self, images: ImageList, spec: PipelineSpec, train: bool, gpu: bool, device, rank: int, world: int):
        require_dali()
        unsupported = spec.augment.random_transforms() if train else []
        if unsupported:
            # DALI has these operators, but their random draws come from the pipeline's generator, whose state runs
            # on from epoch to epoch: a resumed run would not replay them, which every backend here guarantees.
            raise UserError(
                f"{', '.join(unsupported)}: not available on the DALI backends (only --vflip and --no-hflip are); "
                "use --data-backend pytorch"
            )
        self.images, self.indices = images, shard_indices(len(images), spec, train, rank, world)
        self.spec, self.train, self.gpu, self.device = spec, train, gpu, device
        if train and images.sizes is None:
            log.info("%s: no image sizes from a start-up check; DALI's workers read each header per epoch",
                     images.root)  # fmt: skip
        self.iterator, self.pipe, self.next_epoch, self.fresh = None, None, None, False
        super().__init__(-(-self.indices.epoch_length() // spec.batch_size))

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.close()
        source = DaliBatchSource(self.images, self.spec, self.train, self.indices, first_epoch=self.epoch)
        self.pipe = _dali_pipeline(
            source,
            self.train,
            self.spec,
            self.gpu,
            batch_size=self.spec.batch_size,
            num_threads=max(1, self.spec.workers),
            device_id=(self.device.index or 0) if self.gpu else None,
            seed=self.spec.seed,
            prefetch_queue_depth=2,
            py_num_workers=reader_workers(self.spec.workers),
            # Forking a process that has initialised CUDA is unsafe; on CPU fork starts the workers faster.
            py_start_method="spawn" if self.gpu else "fork",
        )
        self.pipe.build()
        self.iterator = DALIGenericIterator(
            self.pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
            prepare_first_batch=False,
        )  # fmt: skip
        self.fresh = True

    def close(self) -> None:
        """Stop the pipeline and its worker processes."""
        self.iterator = None
        if self.pipe is not None:
            del self.pipe
            self.pipe = None

    def _suspects(self, done: int) -> list[str]:
        """The files of the batches that may have been inside DALI when it failed."""
        bs = self.spec.batch_size
        batch = self.indices(self.epoch)[done * bs : (done + IN_FLIGHT) * bs]
        return [self.images.files[i] for i in batch]

    def __iter__(self):
        if self.iterator is None or self.epoch != self.next_epoch:
            self._build()  # the first epoch, or not the one after the last (DALI's epochs only count up)
        elif not self.fresh:
            self.iterator.reset()
        self.fresh = False
        memory_format = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        self.done, finished = 0, False
        try:
            for batch in _dali_batches(self.iterator, lambda: self._suspects(self.done), self.spec.workers):
                images, labels = batch[0]["images"], batch[0]["labels"]
                if self.spec.channels_last:
                    images = images.permute(0, 3, 1, 2)
                images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
                self.done += 1
                yield images, as_targets(labels.to(self.device, non_blocking=True), self.images.multilabel)
            finished = True
        finally:
            # Left mid-epoch (--max-steps-per-epoch, an error): batches of this epoch are still queued inside
            # DALI, so the next epoch starts from a new pipeline.
            self.next_epoch = self.epoch + 1
            if not finished:
                self.close()


def _dali_batches(iterator, suspects, workers: int):
    """Iterate a DALI iterator; a decode failure deep inside DALI becomes one error naming the files (found
    by decoding the batches that were inside DALI, ``suspects()``, one by one)."""
    try:
        yield from iterator
    except RuntimeError as e:
        bad = dali_undecodable(suspects(), workers)
        if bad:
            raise UserError(
                f"DALI cannot decode {len(bad)} file(s):\n{format_bad(bad)}\n"
                "Leave them out (--skip-bad-images with the default --image-check finds them at start-up), "
                "convert them, or use --data-backend pytorch."
            ) from None
        raise UserError(
            f"DALI could not read the data: {dali_reason(e)}\n"
            "Run `convnets prepare --check DATA` to list undecodable files."
        ) from None
