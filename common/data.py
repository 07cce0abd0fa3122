"""Data: ImageFolder scanning, image checks, sharding, and the four backends behind one contract.

Every backend yields ``(images, labels)`` on the training device: images float, normalised with the ImageNet
mean and std, NCHW in the requested memory format; labels int64. Train: RandomResizedCrop to ``image_size``
plus a horizontal flip. Eval: resize the shorter side to ``resize_size``, center crop ``image_size``.

Order and augmentation are functions of (seed, epoch) alone, never of the state a previous epoch left behind,
so that a run resumed at an epoch boundary replays exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

log = logging.getLogger(__name__)

# Formats that both DALI's decoders and PIL read; GIF is left out because DALI cannot decode it.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
DECODABLE_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "MPO"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageList:
    """The files of one split, their labels (indices into ``classes``) and the class names."""

    root: Path
    files: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.files)

    def without(self, bad: set[str]) -> ImageList:
        keep = [i for i, f in enumerate(self.files) if f not in bad]
        return ImageList(self.root, [self.files[i] for i in keep], [self.labels[i] for i in keep], self.classes)


def image_files(folder: str | Path) -> tuple[list[str], Counter]:
    """Image files below ``folder``, sorted, and ``{extension: count}`` of the other files left out.

    Follows symlinked folders as torchvision's ImageFolder does (``Path.rglob`` does not before Python 3.13),
    visiting each real folder once. Hidden files and folders (``.thumbnails``, macOS ``._x.jpg``) are skipped.
    """
    files, ignored, seen = [], Counter(), set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in IMG_EXTENSIONS:
                files.append(os.path.join(dirpath, name))
            else:
                ignored[ext or "(none)"] += 1
    return sorted(files), ignored


def log_ignored(folder: str | Path, ignored: Counter) -> None:
    """One line for the files :func:`image_files` left out, by extension, most frequent first."""
    if ignored:
        what = ", ".join(f"{n} {ext}" for ext, n in ignored.most_common())
        log.info("%s: left out %d file(s) that are not images of a supported type (%s)", folder,
                 sum(ignored.values()), what)  # fmt: skip


def scan_split(split_dir: str | Path, classes: list[str] | None = None) -> ImageList:
    """List an ImageFolder split: ``split_dir/<class>/**/<image>``, classes sorted by folder name.

    Args:
        split_dir: the split folder (``DATA/train``).
        classes: the class list to label against (the training classes, for val); default: this split's
            folders, each of which must then hold an image.
    Raises:
        UserError: the folder is missing, has no class folders, a class folder of its own holds no image, or
            the split has a class that ``classes`` does not.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(
            f"data folder {split_dir} does not exist (expected an ImageFolder split: {split_dir}/<class>/*)"
        )
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"data folder {split_dir} has no class folders (expected {split_dir}/<class>/*)")
    own_classes = classes is None
    classes = found if own_classes else classes
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(
            f"{split_dir} has class folders that are not among the training classes: {', '.join(unknown[:10])}"
        )
    index = {c: i for i, c in enumerate(classes)}
    files, labels, empty, ignored = [], [], [], Counter()
    for name in found:
        images, other = image_files(split_dir / name)
        if not images:
            empty.append(str(split_dir / name))
        files += images
        labels += [index[name]] * len(images)
        ignored += other
    if empty and own_classes:
        raise UserError(f"class folders with no images ({', '.join(IMG_EXTENSIONS)}): {', '.join(empty)}")
    if empty:
        log.info("%s: no images in %s; those classes are not evaluated", split_dir, ", ".join(empty))
    log_ignored(split_dir, ignored)
    return ImageList(split_dir, files, labels, list(classes))


def check_image(path: str, full: bool = True) -> str | None:
    """Why ``path`` cannot be decoded, or None when it can.

    ``full`` decodes the whole image (catches truncation); JPEGs are decoded at 1/8 scale through
    ``draft``, which still reads every byte of the entropy stream but skips most of the arithmetic.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            if im.format not in DECODABLE_FORMATS:
                return f"unsupported format {im.format}"
            if full:
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise OSError, SyntaxError, ValueError, struct.error...
        return f"cannot decode ({type(e).__name__}: {e})"
    return None


def find_bad_images(files: list[str], full: bool = True, workers: int = 1, dali: bool = False) -> dict[str, str]:
    """Check every file; returns ``{path: reason}`` for those that cannot be decoded.

    PIL reads every header (and, with ``full`` and not ``dali``, decodes every image). With ``dali`` the full
    decode is DALI's own CPU decoder, the one the DALI backends train with: a few files PIL reads DALI
    rejects (16-bit BMP, 32-bit integer TIFF), and the check must reject them too.
    """
    pil_full = full and not dali
    if workers > 1 and len(files) > 2000:
        with ProcessPoolExecutor(workers) as pool:
            reasons = list(pool.map(check_image, files, [pil_full] * len(files), chunksize=512))
    else:
        reasons = [check_image(f, pil_full) for f in files]
    bad = {f: r for f, r in zip(files, reasons, strict=True) if r is not None}
    if full and dali:
        bad |= dali_undecodable([f for f in files if f not in bad], workers)
    return dict(sorted(bad.items()))


def format_bad(bad: dict[str, str], limit: int = 20) -> str:
    lines = [f"  {path}: {why}" for path, why in list(bad.items())[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def drop_bad_images(splits: list[ImageList], mode: str, skip_bad: bool, workers: int, dali: bool = False,
                    rank: int = 0, world: int = 1, gather=lambda found: [found]):  # fmt: skip
    """Stop with the list of undecodable files of every split at once, or leave them out with one warning
    when ``skip_bad``; returns the splits without them.

    In a distributed run each rank checks every ``world``-th file and ``gather`` (an all-gather of objects)
    shares what they found, so that start-up does not grow with the number of GPUs.
    """
    if mode == "none":
        return splits
    found = {}
    for images in splits:
        found |= find_bad_images(images.files[rank::world], full=mode == "full", workers=workers, dali=dali)
    bad = dict(sorted(item for part in gather(found) for item in part.items()))
    if not bad:
        return splits
    roots = " and ".join(str(images.root) for images in splits)
    if not skip_bad:
        raise UserError(
            f"{len(bad)} file(s) in {roots} cannot be decoded:\n{format_bad(bad)}\n"
            "Remove them, or pass --skip-bad-images to leave them out."
        )
    log.warning("leaving out %d file(s) that cannot be decoded:\n%s", len(bad), format_bad(bad))
    kept = [images.without(set(bad)) for images in splits]
    for images in kept:
        if not images.files:
            raise UserError(f"no decodable image left in {images.root}")
    return kept


# ----------------------------------------------------------------------------------------------------------
# Sharding


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_shard(n: int, batch_size: int, rank: int, world: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's sample indices for one training epoch.

    The epoch's permutation is cut into global batches of ``batch_size * world``; rank r takes the r-th
    block of ``batch_size`` from each. So a DDP step sees the same images as one process with a
    ``world``-times larger batch, and rank r's batch equals micro-batch r of a single process accumulating
    gradients: runs of different sizes are comparable sample for sample. Incomplete global batches are dropped.
    """
    perm = epoch_permutation(n, seed, epoch)
    steps = n // (batch_size * world)
    return perm[: steps * batch_size * world].reshape(steps, world, batch_size)[:, rank].reshape(-1)


def eval_shard(n: int, rank: int, world: int) -> np.ndarray:
    """Every image exactly once across ranks (results are summed over ranks)."""
    return np.arange(rank, n, world)


def shard_indices(n: int, spec: PipelineSpec, train: bool, rank: int, world: int):
    """``epoch -> this rank's indices`` for either split: a new block permutation per training epoch, the same
    fixed shard every eval epoch. Every backend orders its data through this one function."""
    if train:
        return lambda epoch: train_shard(n, spec.batch_size, rank, world, spec.seed, epoch)
    shard = eval_shard(n, rank, world)
    return lambda epoch: shard


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Per-image augmentation seed: independent of rank, worker and batch, so sharding cannot change it."""
    return int(np.random.default_rng([seed, epoch, index]).integers(2**62))


# ----------------------------------------------------------------------------------------------------------
# Backends


@dataclass(frozen=True)
class PipelineSpec:
    """What a backend needs to know about the images it produces."""

    image_size: int
    resize_size: int
    min_crop_scale: float = 0.08
    batch_size: int = 256
    workers: int = 4
    channels_last: bool = False
    seed: int = 0


class Normalizer:
    """uint8 NCHW -> normalised float in the requested memory format, on the training device."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=self.memory_format).float()
        return images.sub_(self.mean).div_(self.std)


def train_transform(spec: PipelineSpec):
    """RandomResizedCrop + horizontal flip on uint8 CHW tensors (torchvision transforms v2)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(spec.image_size, scale=(spec.min_crop_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )


def eval_transform(spec: PipelineSpec):
    """Resize the shorter side, then center crop (the same for the loaders and for ``predict``)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(spec.resize_size, antialias=True), v2.CenterCrop(spec.image_size)])


def load_rgb(path: str) -> torch.Tensor:
    """Decode any PIL-readable image (grayscale, palette, RGBA, CMYK, 16-bit, ...) to uint8 RGB CHW, as DALI's
    decoders do: the EXIF orientation applied, 16-bit values scaled by 255/65535, float images by 255."""
    from PIL import Image, ImageOps
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("F", "I") or im.mode.startswith("I;16"):
            # PIL's convert("RGB") clips these to 0..255: 16-bit images would turn white, float ones black.
            scale = 255.0 if im.mode == "F" else 255.0 / 65535.0
            grey = np.clip(np.asarray(im, dtype=np.float64) * scale, 0, 255).round().astype(np.uint8)
            im = Image.fromarray(grey)
        return F.pil_to_tensor(im.convert("RGB"))


class BadImageError(UserError):
    """A file the loader cannot decode, named by path (raised in DataLoader workers, re-raised here)."""


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes with PIL (every mode becomes RGB) and augments with torchvision transforms v2."""

    def __init__(self, images: ImageList, transform, seed: int):
        self.files, self.labels, self.transform, self.seed = images.files, images.labels, transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        try:
            image = load_rgb(self.files[index])
        except Exception as e:  # noqa: BLE001 - any decoder failure: name the file instead of a worker traceback
            raise BadImageError(f"cannot decode {self.files[index]} ({type(e).__name__}: {e})") from None
        # Seed the transform per image so that its crop and flip do not depend on which worker or rank
        # happens to load it (see sample_seed).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            image = self.transform(image)
        return image, self.labels[index]


class _EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, epoch)`` so persistent workers learn the epoch without being restarted."""

    def __init__(self, indices_for_epoch):
        self.indices_for_epoch, self.epoch = indices_for_epoch, 0

    def __iter__(self):
        return ((int(i), self.epoch) for i in self.indices_for_epoch(self.epoch))

    def __len__(self):
        return len(self.indices_for_epoch(self.epoch))


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


class PytorchLoader(Loader):
    """torch DataLoader workers, pinned memory, and (on GPU) a side stream that copies the next batch while
    the current one computes; normalisation happens on the device, where it is cheap."""

    def __init__(self, images: ImageList, spec: PipelineSpec, train: bool, device, rank: int, world: int):
        transform = train_transform(spec) if train else eval_transform(spec)
        self.sampler = _EpochSampler(shard_indices(len(images), spec, train, rank, world))
        self.loader = torch.utils.data.DataLoader(
            _ImageDataset(images, transform, spec.seed),
            batch_size=spec.batch_size,
            sampler=self.sampler,
            num_workers=spec.workers,
            pin_memory=device.type == "cuda",
            drop_last=train,
            persistent_workers=spec.workers > 0,
            prefetch_factor=4 if spec.workers > 0 else None,
        )
        super().__init__(len(self.loader))
        self.device = device
        self.normalize = Normalizer(device, spec.channels_last)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.epoch = epoch

    def _to_device(self, batch):
        images, labels = batch
        return self.normalize(images.to(self.device, non_blocking=True)), labels.to(self.device, non_blocking=True)

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


def _dali():
    try:
        from nvidia import dali
    except ImportError:
        raise UserError(
            "the DALI backends need nvidia-dali (pip install nvidia-dali-cuda130); or use --data-backend pytorch"
        ) from None
    return dali


def dali_reason(error: Exception) -> str:
    """The line of a DALI pipeline error that says what went wrong (the rest is DALI's own traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1 :]
        lines = [line for line in after if "no longer valid" not in line] or lines
    return lines[0][:300] if lines else type(error).__name__


class _DecodeProbe:
    """Decodes batches of files with DALI's CPU decoder and says whether it failed; a DALI pipeline is dead
    after an error, so a new one is built after each failure."""

    def __init__(self, batch_size: int, workers: int):
        self.batch_size, self.workers, self.pipe = batch_size, max(1, workers), None

    def _build(self):
        dali = _dali()

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self.workers, device_id=None,
                           prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)  # fmt: skip
        def probe():
            encoded = dali.fn.external_source(name="encoded")
            return dali.fn.decoders.image(encoded, device="cpu", output_type=dali.types.RGB)

        self.pipe = probe()
        self.pipe.build()

    def error(self, files: list[str]) -> str | None:
        try:
            data = [np.fromfile(f, dtype=np.uint8) for f in files]
        except OSError as e:
            return f"cannot read ({e})"
        if self.pipe is None:
            self._build()
        try:
            self.pipe.feed_input("encoded", data)
            self.pipe.run()
            return None
        except RuntimeError as e:
            self.pipe = None
            return dali_reason(e)


def dali_undecodable(files: list[str], workers: int = 1, batch_size: int = 64) -> dict[str, str]:
    """``{path: reason}`` for the files DALI's CPU decoder rejects: batches first, then file by file in a
    batch that failed, so a clean set costs one decode of each file."""
    probe, bad = _DecodeProbe(batch_size, workers), {}
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        if probe.error(chunk) is None:
            continue
        for f in chunk:
            why = probe.error([f])
            if why is not None:
                bad[f] = f"DALI cannot decode it: {why}"
    return bad


def counter_uniforms(seed: int, epoch: int, indices: np.ndarray, k: int) -> np.ndarray:
    """``k`` uniforms in [0, 1) per index, a pure function of (seed, epoch, index): SplitMix64 over a counter,
    vectorised, so a batch costs microseconds and no generator state crosses epochs."""
    with np.errstate(over="ignore"):
        base = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) ^ (np.uint64(epoch) * np.uint64(0xBF58476D1CE4E5B9))
        x = base + np.asarray(indices, dtype=np.uint64)[:, None] * np.uint64(1 << 20) + np.arange(k, dtype=np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


CROP_TRIES = 10


def random_resized_crop_window(
    u: np.ndarray, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[float, float, float, float]:
    """RandomResizedCrop's window with torchvision's sampling (10 tries, then the central crop with the ratio
    clamped), from ``4 * CROP_TRIES`` uniforms ``u``; returned normalised as (x, y, w, h)."""
    area = width * height
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for t in range(CROP_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[4 * t])
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[4 * t + 1])
        w, h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(u[4 * t + 2] * (width - w + 1)), int(u[4 * t + 3] * (height - h + 1))
            return x / width, y / height, w / width, h / height
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) / 2 / width, (height - h) / 2 / height, w / width, h / height


def _image_size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) from the header; (1, 1) for a file DALI will then report as undecodable."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return im.size
    except Exception:  # noqa: BLE001 - see _dali_batches for how DALI's error reaches the user
        return 1, 1


class _DaliSource:
    """Feeds DALI's ``external_source`` one batch at a time: encoded files, labels, and (for training) each
    image's crop window and flip, drawn from (seed, epoch, index) by :func:`counter_uniforms`.

    File reads go through a thread pool (they release the GIL); image sizes, needed for the crop's aspect
    ratio, are read from the header once per file and cached. Raising StopIteration ends DALI's epoch.
    """

    def __init__(self, images: ImageList, spec: PipelineSpec, train: bool, indices_for_epoch):
        from concurrent.futures import ThreadPoolExecutor

        self.images, self.spec, self.train, self.indices_for_epoch = images, spec, train, indices_for_epoch
        self.pool = ThreadPoolExecutor(max(1, spec.workers))
        self.sizes: dict[int, tuple[int, int]] = {}
        # The batches handed to DALI but maybe not yet decoded: where to look when a decode fails.
        self.recent: deque[np.ndarray] = deque(maxlen=4)
        self.set_epoch(0)

    def recent_files(self) -> list[str]:
        return [self.images.files[i] for batch in self.recent for i in batch]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.order, self.position = epoch, self.indices_for_epoch(epoch), 0

    def _read(self, index: int) -> np.ndarray:
        with open(self.images.files[index], "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8)

    def __call__(self):
        if self.position >= len(self.order):
            raise StopIteration
        batch = self.order[self.position : self.position + self.spec.batch_size]
        self.position += len(batch)
        self.recent.append(batch)
        data = list(self.pool.map(self._read, batch))
        labels = [np.array([self.images.labels[i]], dtype=np.int32) for i in batch]
        if not self.train:
            return data, labels
        u = counter_uniforms(self.spec.seed, self.epoch, batch, 4 * CROP_TRIES + 1)
        anchors, shapes = [], []
        for i, index in enumerate(batch):
            if index not in self.sizes:
                self.sizes[index] = _image_size(data[i])
            x, y, w, h = random_resized_crop_window(u[i], *self.sizes[index], (self.spec.min_crop_scale, 1.0))
            anchors.append(np.array([x, y], np.float32))
            shapes.append(np.array([w, h], np.float32))
        mirrors = [np.array(flip, dtype=np.int32) for flip in u[:, -1] < 0.5]
        return data, labels, anchors, shapes, mirrors


def _dali_pipeline(source: _DaliSource, train: bool, spec: PipelineSpec, decoder: str, **pipeline_kwargs):
    """Build the DALI graph: one function for train and eval, as ``@pipeline_def`` intends."""
    dali = _dali()
    fn, types = dali.fn, dali.types

    @dali.pipeline_def(**pipeline_kwargs)
    def pipeline():
        if train:
            encoded, label, anchor, shape, mirror = fn.external_source(source, num_outputs=5, batch=True)
            images = fn.decoders.image_slice(encoded, anchor, shape, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size, antialias=True)
        else:
            encoded, label = fn.external_source(source, num_outputs=2, batch=True)
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=spec.resize_size, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            # HWC viewed as NCHW is channels_last in memory: the permute below is free.
            output_layout="HWC" if spec.channels_last else "CHW",
            crop=(spec.image_size, spec.image_size),
            mean=[m * 255 for m in IMAGENET_MEAN],
            std=[s * 255 for s in IMAGENET_STD],
            mirror=mirror,
        )
        return images, label

    return pipeline()


class DaliLoader(Loader):
    """DALI decoders and augmentation; ``gpu`` uses the mixed (nvJPEG) decoder and GPU resizing.

    One pipeline lives for the whole run (building one per epoch leaks host memory inside DALI, about 12 MB
    an epoch). Its ``external_source`` decides the order and the random crops, so that they depend on
    (seed, epoch) alone and a resumed run replays them exactly; DALI's own reader and random operators carry
    state from epoch to epoch.
    """

    def __init__(self, images: ImageList, spec: PipelineSpec, train: bool, gpu: bool, device, rank: int, world: int):
        _dali()
        indices = shard_indices(len(images), spec, train, rank, world)
        self.source = _DaliSource(images, spec, train, indices)
        self.spec, self.train, self.gpu, self.device = spec, train, gpu, device
        self.iterator = None
        self.fresh = False
        super().__init__(-(-len(indices(0)) // spec.batch_size))

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = _dali_pipeline(
            self.source,
            self.train,
            self.spec,
            decoder="mixed" if self.gpu else "cpu",
            batch_size=self.spec.batch_size,
            num_threads=max(1, self.spec.workers),
            device_id=(self.device.index or 0) if self.gpu else None,
            seed=self.spec.seed,
            prefetch_queue_depth=2,
        )
        pipe.build()
        self.iterator = DALIGenericIterator(
            pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
            prepare_first_batch=False,
        )  # fmt: skip
        self.fresh = True

    def __iter__(self):
        self.source.set_epoch(self.epoch)
        if self.iterator is None:
            self._build()
        elif not self.fresh:
            self.iterator.reset()
        self.fresh = False
        memory_format = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        finished = False
        try:
            for batch in _dali_batches(self.iterator, self.source.recent_files, self.spec.workers):
                images, labels = batch[0]["images"], batch[0]["labels"]
                if self.spec.channels_last:
                    images = images.permute(0, 3, 1, 2)
                images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
                yield images, labels.view(-1).long().to(self.device, non_blocking=True)
            finished = True
        finally:
            if not finished:
                # Left mid-epoch (--max-steps-per-epoch, an error): batches of this epoch are still queued
                # inside DALI, so the next epoch starts from a new pipeline.
                self.iterator = None


def _dali_batches(iterator, suspects, workers: int):
    """Iterate a DALI iterator; a decode failure deep inside DALI becomes one error naming the files (found
    by decoding the batches last handed to DALI, ``suspects()``, one by one)."""
    try:
        yield from iterator
    except RuntimeError as e:
        bad = dali_undecodable(suspects(), workers)
        if bad:
            raise UserError(
                f"DALI cannot decode {len(bad)} file(s):\n{format_bad(bad)}\n"
                "Leave them out (--skip-bad-images with the default --image-check full finds them at start-up), "
                "convert them, or use --data-backend pytorch."
            ) from None
        raise UserError(
            f"DALI could not read the data: {dali_reason(e)}\n"
            "Run `convnets prepare --check DATA` to list undecodable files."
        ) from None


class SyntheticLoader(Loader):
    """Random images already on the device: measures the model and the loop with no input pipeline."""

    def __init__(self, spec: PipelineSpec, num_classes: int, n_batches: int, device):
        super().__init__(n_batches)
        g = torch.Generator(device="cpu").manual_seed(spec.seed)
        memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        shape = (spec.batch_size, 3, spec.image_size, spec.image_size)
        self.images = torch.randn(shape, generator=g).to(device).contiguous(memory_format=memory_format)
        self.labels = torch.randint(0, num_classes, (spec.batch_size,), generator=g).to(device)

    def __iter__(self):
        for _ in range(self.n_batches):
            yield self.images, self.labels


def default_backend(device: torch.device) -> str:
    return "dali-gpu" if device.type == "cuda" else "dali-cpu"


def build_loader(
    backend: str, images: ImageList, spec: PipelineSpec, train: bool, device, rank: int = 0, world: int = 1
) -> Loader:
    """The loader for one split on the chosen backend (``synthetic`` keeps the split's batch count)."""
    if backend == "dali-gpu" and device.type != "cuda":
        raise UserError("--data-backend dali-gpu needs a GPU; use dali-cpu or pytorch on this machine")
    if backend in ("dali-gpu", "dali-cpu"):
        return DaliLoader(images, spec, train, backend == "dali-gpu", device, rank, world)
    if backend == "pytorch":
        return PytorchLoader(images, spec, train, device, rank, world)
    if backend == "synthetic":
        n = len(images) // (spec.batch_size * world) if train else -(-len(images) // (spec.batch_size * world))
        return SyntheticLoader(spec, len(images.classes), max(1, n), device)
    raise UserError(f"unknown --data-backend {backend!r}")
