"""``convnets prepare``: build ImageFolder trees from known data sets, and check a tree for bad files."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import struct
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from common.data import CheckCache, find_bad_images, format_bad, image_files
from common.data.checks import CACHE_NAME
from common.errors import UserError

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
# Debian's dataset-fashion-mnist installs the IDX files here.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format MNIST-style data sets ship in."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise UserError(f"{path} is not an IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {array.size}")
    return array.reshape(dims)


def _find_idx(name: str, source: Path | None) -> Path:
    folders = [source] if source else [Path(d) for d in FASHION_MNIST_DIRS]
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz", folder / "raw" / name, folder / "raw" / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _download_fashion_mnist(target: Path) -> Path:
    """Fall back on torchvision's downloader where the Debian package is not installed (needs internet)."""
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - any network failure ends in the same advice
        raise UserError(
            "Fashion-MNIST IDX files not found in "
            f"{', '.join(FASHION_MNIST_DIRS)} and the download failed ({e}). "
            "Install them with `apt-get install dataset-fashion-mnist`, or pass --source DIR."
        ) from None
    return target / "FashionMNIST"


def _write_pngs(args: tuple[np.ndarray, list[Path]]) -> None:
    from PIL import Image

    images, paths = args
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(image, mode="L").save(path, optimize=False, compress_level=1)


def _cache_verdicts(root: Path, jobs: list[tuple[np.ndarray, list[Path]]]) -> None:
    """Record every written PNG as decodable in ``root``'s image-check cache, as ``prepare folder`` records its
    files, so training's start-up check reads 70,000 verdicts instead of decoding (or, past its limit, only
    reading the headers of) 70,000 files.

    No decode is needed to know the verdict: each file is an 8-bit grayscale PNG that PIL encoded a moment ago
    from a complete IDX array, a format PIL and DALI's decoder both read. The tree is renamed into place
    afterwards, which keeps the size and mtime the cache keys on.
    """
    cache = CheckCache(root, load=False)
    for images, paths in jobs:
        height, width = images.shape[1:]
        for path in paths:
            cache.record_decoded(str(path), width, height, dali=True)
    cache.save()


def prepare_fashion_mnist(out: Path, source: Path | None = None, workers: int = 2) -> dict[str, int]:
    """Write Fashion-MNIST as ``out/{train,val}/<class>/<index>.png`` (train: 60,000; val: the 10,000 test images).

    The tree is built in a temporary sibling folder and renamed into place, so an interrupted run never
    leaves a half-written data set behind that a later run would take as complete.
    """
    out = Path(out)
    if (out / "train").is_dir() and (out / "val").is_dir():
        counts = {s: sum(1 for _ in (out / s).rglob("*.png")) for s in ("train", "val")}
        if counts == {"train": 60000, "val": 10000}:
            log.info("%s already holds Fashion-MNIST (%d train, %d val images)", out, counts["train"], counts["val"])
            return counts
        raise UserError(
            f"{out} exists but is not a complete Fashion-MNIST tree ({counts}); remove it or pick another --out"
        )
    if _find_idx(FASHION_MNIST_FILES["train"][0], source) is None:
        source = _download_fashion_mnist(out.parent / ".fashion-mnist-download") / "raw"
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    jobs = []
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        paths = [_find_idx(name, source) for name in (image_file, label_file)]
        if None in paths:
            raise UserError(
                f"Fashion-MNIST file {image_file} or {label_file} not found in {source or FASHION_MNIST_DIRS}"
            )
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if len(images) != len(labels):
            raise UserError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
        for name in FASHION_MNIST_CLASSES:
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
        targets = [tmp / split / FASHION_MNIST_CLASSES[y] / f"{i:05d}.png" for i, y in enumerate(labels)]
        for start in range(0, len(images), 5000):
            jobs.append((images[start : start + 5000], targets[start : start + 5000]))
        counts[split] = len(images)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(_write_pngs, jobs))
    _cache_verdicts(tmp, jobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    log.info("wrote %s: %d train and %d val images in %d classes; image verdicts cached in %s", out,
             counts["train"], counts["val"], 10, out / CACHE_NAME)  # fmt: skip
    return counts


def check_tree(root: Path, workers: int) -> dict[str, str]:
    """Every undecodable image file below ``root`` (by full decode), as ``{path: reason}``.

    Verdicts are cached with training's (see :mod:`common.data.checks`): a check after a check, or a training
    run after this one, decodes only new or changed files.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    files = image_files(root)[0]
    cache = CheckCache(root)
    bad = find_bad_images(files, full=True, workers=workers, cache=cache)
    # Also what DALI's decoder rejects: the DALI backends train with it, and it refuses a few files PIL reads.
    try:
        bad = dict(sorted((bad | find_bad_images(files, full=True, workers=workers, dali=True, cache=cache)).items()))
    except UserError as e:
        log.info("checked with PIL only: %s", e)
    saved = cache.save()
    log.info("checked %d image files below %s: %d cannot be decoded%s", len(files), root, len(bad),
             f" (verdicts cached in {saved})" if saved else "")  # fmt: skip
    if bad:
        print(format_bad(bad, limit=len(bad)))
    return bad
