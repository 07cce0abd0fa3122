"""Order and augmentation as pure functions of (seed, epoch, index): shards, per-epoch permutations, counter-based
uniforms and RandomResizedCrop windows. Every backend draws from these, so they all see the same images in the
same order with the same crops, and a run resumed at an epoch boundary replays exactly what an uninterrupted run
would have seen.
"""

from __future__ import annotations

import numpy as np

from common.data.spec import PipelineSpec

CROP_TRIES = 10
# Uniforms per image: 4 per RandomResizedCrop try, then one for the flip.
UNIFORMS_PER_IMAGE = 4 * CROP_TRIES + 1


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


class ShardIndices:
    """``epoch -> this rank's indices`` for either split: a new block permutation per training epoch, the same
    fixed shard every eval epoch. Every backend orders its data through this one object (a class rather than a
    closure so that DALI's worker processes can receive it pickled)."""

    def __init__(self, n: int, spec: PipelineSpec, train: bool, rank: int, world: int):
        self.n, self.batch_size, self.seed, self.train, self.rank, self.world = (
            n, spec.batch_size, spec.seed, train, rank, world,
        )  # fmt: skip

    def __call__(self, epoch: int) -> np.ndarray:
        if self.train:
            return train_shard(self.n, self.batch_size, self.rank, self.world, self.seed, epoch)
        return eval_shard(self.n, self.rank, self.world)

    def epoch_length(self) -> int:
        """Images per epoch on this rank (the same every epoch)."""
        if self.train:
            return self.n // (self.batch_size * self.world) * self.batch_size
        return len(range(self.rank, self.n, self.world))


def shard_indices(n: int, spec: PipelineSpec, train: bool, rank: int, world: int) -> ShardIndices:
    return ShardIndices(n, spec, train, rank, world)


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


def random_resized_crop_window(
    u: np.ndarray, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[float, float, float, float]:
    """RandomResizedCrop's window with torchvision's sampling (10 tries, then the central crop with the ratio
    clamped), from ``4 * CROP_TRIES`` uniforms ``u``; returned normalised as (x, y, w, h).

    ``width`` and ``height`` are the displayed (EXIF-oriented) size: both DALI's decoders and PIL's
    ``exif_transpose`` rotate before cropping, so a window drawn on the stored size would land elsewhere.
    """
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


def train_augmentations(seed: int, epoch: int, indices: np.ndarray, sizes: np.ndarray, min_crop_scale: float):
    """Crop windows (``(n, 4)`` float32: normalised x, y, w, h in the displayed frame) and flips (``(n,)`` bool)
    of the training images ``indices`` with displayed ``sizes`` (``(n, 2)``: width, height). The uniforms of a
    whole batch are drawn in one vectorised call; only torchvision's rejection loop runs per image."""
    u = counter_uniforms(seed, epoch, np.asarray(indices), UNIFORMS_PER_IMAGE)
    sizes = np.maximum(np.asarray(sizes, dtype=np.int64).reshape(-1, 2), 1)  # an unreadable file: DALI names it
    windows = np.array(
        [random_resized_crop_window(u[i], int(w), int(h), (min_crop_scale, 1.0)) for i, (w, h) in enumerate(sizes)],
        dtype=np.float32,
    ).reshape(-1, 4)
    return windows, u[:, -1] < 0.5


def extra_draws(seed: int, epoch: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertical flips (``(n,)`` bool) and one seed per image (``(n,)`` int64) for the random transforms beyond crop
    and flips, from the two uniforms after the crop's and the flip's: the existing draws stay what they were."""
    u = counter_uniforms(seed, epoch, np.asarray(indices), UNIFORMS_PER_IMAGE + 2)[:, UNIFORMS_PER_IMAGE:]
    return u[:, 0] < 0.5, (u[:, 1] * float(1 << 53)).astype(np.int64)


def train_augmentation(seed: int, epoch: int, index: int, size: tuple[int, int], min_crop_scale: float):
    """One training image's crop window (normalised x, y, w, h in the displayed frame) and flip."""
    windows, flips = train_augmentations(seed, epoch, np.array([index]), np.array([size]), min_crop_scale)
    return tuple(float(v) for v in windows[0]), bool(flips[0])
