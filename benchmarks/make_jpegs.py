"""ImageNet-like JPEGs for timing real data pipelines where no data set can be fetched (the GPU machine has no
network): random crops of scikit-image's bundled photographs, resized to ImageNet's typical sizes (the longer side
500, 4:3, 3:2, 1:1 or portrait), flipped, their brightness and contrast jittered, saved at qualities 60 to 95 with
4:2:0 or 4:4:4 chroma subsampling, as an ImageFolder tree (train/ and val/, one class per source photo).

    python -m benchmarks.make_jpegs OUT --count 20000 --processes 16

Decode cost is what a pipeline benchmark needs to be real, and it depends on pixel count, quality and subsampling,
which these match; the content only has to be photographic (smooth regions, edges, texture), which it is.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs bundled with scikit-image (no download: pooch is never asked), one class each.
SOURCES = ("astronaut", "cat", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket", "retina",
           "motorcycle", "colorwheel")  # fmt: skip
# (width, height) of the longer-side-500 shapes ImageNet mostly holds, landscape ones more often.
SHAPES = ((500, 375), (500, 375), (500, 333), (500, 375), (500, 500), (375, 500), (333, 500), (500, 400))
VAL_EVERY = 10  # one file in ten goes to val/


def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return image[..., :3]


def _jittered(source: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random crop of 30 to 100% of the photo's area at about the target aspect, resized, maybe flipped."""
    h, w = source.shape[:2]
    aspect = size[0] / size[1] * rng.uniform(0.85, 1.15)
    area = h * w * rng.uniform(0.3, 1.0)
    cw = int(min(w, np.sqrt(area * aspect)))
    ch = int(min(h, cw / aspect))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(source[y : y + ch, x : x + cw])
    image = crop.resize(size, Image.BICUBIC if rng.random() < 0.5 else Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    gain, offset = rng.uniform(0.75, 1.25), rng.uniform(-20, 20)
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * gain + offset, 0, 255).astype(np.uint8))


_photos: list[np.ndarray] = []  # each worker process's decoded sources, loaded once by _load_photos


def _load_photos() -> None:
    _photos[:] = [_photo(name) for name in SOURCES]


def _write_range(args: tuple[Path, int, int, int]) -> int:
    """Files ``start`` .. ``stop - 1``; each from its own seed, so any split over processes writes the same tree."""
    root, start, stop, seed = args
    photos = _photos
    written = 0
    for i in range(start, stop):
        rng = np.random.default_rng((seed, i))
        label = i % len(SOURCES)
        size = SHAPES[int(rng.integers(len(SHAPES)))]
        image = _jittered(photos[label], rng, size)
        split = "val" if (i // len(SOURCES)) % VAL_EVERY == 0 else "train"  # a tenth of every class
        path = root / split / SOURCES[label] / f"{i:06d}.jpg"
        image.save(path, quality=int(rng.integers(60, 96)), subsampling=0 if rng.random() < 0.2 else 2)
        written += path.stat().st_size
    return written


def make_jpegs(root: Path, count: int, processes: int, seed: int = 0) -> dict:
    """Write ``count`` JPEGs under ``root`` with ``processes`` processes; return what was made and how fast.

    A ``made.json`` beside them says what the tree holds; a tree that already has the same one is kept as it is.
    """
    root = Path(root)
    wanted = {"count": count, "seed": seed, "sources": list(SOURCES), "version": 2}
    marker = root / "made.json"
    if marker.exists() and {k: v for k, v in json.loads(marker.read_text()).items() if k in wanted} == wanted:
        return json.loads(marker.read_text()) | {"reused": True}
    for split in ("train", "val"):
        for name in SOURCES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, count, processes * 4 + 1).astype(int)  # 4 chunks a process evens out the stragglers
    chunks = [(root, int(a), int(b), seed) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    start = time.perf_counter()
    # fork: the children need nothing the parent has not imported, and start at once (no re-import of numpy)
    with multiprocessing.get_context("fork").Pool(processes, initializer=_load_photos) as pool:
        total_bytes = sum(pool.map(_write_range, chunks))
    seconds = time.perf_counter() - start
    made = wanted | {
        "processes": processes,
        "seconds": seconds,
        "files_per_s": count / seconds,
        "mean_kb": total_bytes / count / 1024,
        "val": (val := sum(1 for i in range(count) if (i // len(SOURCES)) % VAL_EVERY == 0)),
        "train": count - val,
        "cpu_count": os.cpu_count(),
    }
    marker.write_text(json.dumps(made, indent=2))
    return made | {"reused": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    made = make_jpegs(args.root, args.count, args.processes, args.seed)
    print(json.dumps(made, indent=2))


if __name__ == "__main__":
    main()
