"""Near duplicates of real photographs: every resized, re-compressed or re-encoded copy of a scikit-image photo
planted in a raw folder collapses with its original in ``prepare folder``, and distinct photos stay apart.

The copies are what users' collections hold: a thumbnail (1/2, 1/3), an upscale (2x), a re-save at JPEG quality
55 and a JPEG turned into a PNG, of originals from 300 to 2,000 pixels wide, so that ``draft`` decodes the members
of one group at different DCT scales (the bug this guards against: a draft at 64 px did, and left copies up to 26
bits apart)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from common import config
from common.owndata.dataset import prepare_own
from common.owndata.dedup import file_hash

skimage = pytest.importorskip("skimage", reason="scikit-image's photos are the test data (make setup installs it)")

# Photographs (not textures or drawings) shipped inside scikit-image's wheel, read without a download.
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "hubble_deep_field.jpg", "moon.png",
          "retina.jpg", "rocket.jpg", "motorcycle_left.png", "clock_motion.png", "microaneurysms.png"]  # fmt: skip
WIDTHS = [300, 420, 640, 900, 1300, 2000]


def photo(name: str) -> Image.Image:
    path = Path(skimage.__file__).parent / "data" / name
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def save_jpeg(image: Image.Image, path: Path, quality: int = 90) -> None:
    image.save(path, "JPEG", quality=quality)


def copies(original: Path) -> dict[str, Image.Image]:
    """The copies a collection gathers of one JPEG: sizes, a re-compression and a re-encoding."""
    with Image.open(original) as im:
        im.load()
    w, h = im.size
    return {
        "half.jpg": im.resize((w // 2, h // 2), Image.LANCZOS),
        "third.jpg": im.resize((w // 3, h // 3), Image.LANCZOS),
        "double.jpg": im.resize((w * 2, h * 2), Image.LANCZOS),
        "q55.jpg": im,
        "copy.png": im,
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, list[Path]]]:
    """``RAW/<class>/`` with one group per photo (the original and its five copies); the first half of the
    photos in class ``a``, the rest in ``b``, the copies of every third group in the other class's folder."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    groups: dict[str, list[Path]] = {}
    for i, name in enumerate(PHOTOS):
        label = "a" if i < len(PHOTOS) // 2 else "b"
        folder = root / label
        folder.mkdir(exist_ok=True)
        image = photo(name)
        width = WIDTHS[i % len(WIDTHS)] + int(rng.integers(0, 40))
        image = image.resize((width, round(width * image.height / image.width)), Image.LANCZOS)
        stem = Path(name).stem
        original = folder / f"{stem}.jpg"
        save_jpeg(image, original)
        members = [original]
        for suffix, copy in copies(original).items():
            path = folder / f"{stem}_{suffix}"
            if suffix.endswith(".png"):
                copy.save(path)
            else:
                save_jpeg(copy, path, 55 if suffix.startswith("q55") else 85)
            members.append(path)
        groups[stem] = members
    return root, groups


def hamming(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def test_copies_hash_close_and_distinct_photos_far(planted):
    """The hash as prepare computes it: within the default radius inside a group, far outside it across groups."""
    radius = config.PrepareOwnConfig.dup_radius
    _, groups = planted
    hashes = {stem: [file_hash(Image.open(p)) for p in members] for stem, members in groups.items()}
    for stem, hs in hashes.items():
        worst = max(hamming(hs[0], h) for h in hs[1:])
        assert worst <= radius, f"{stem}: a copy is {worst} bits from its original (radius {radius})"
    stems = sorted(hashes)
    closest = min(
        hamming(x, y) for i, a in enumerate(stems) for b in stems[i + 1 :] for x in hashes[a] for y in hashes[b]
    )
    assert closest > 2 * radius, f"two different photos are only {closest} bits apart"


def test_every_planted_group_collapses_to_one_image(planted, tmp_path):
    root, groups = planted
    out = tmp_path / "data"
    cfg = config.resolve(config.PrepareOwnConfig, {"dataset": "folder", "src": str(root), "out": str(out),
                                                   "val_fraction": 0.3, "workers": 2})  # fmt: skip
    result = prepare_own(cfg)
    written = [p for p in out.rglob("*") if p.suffix in (".jpg", ".png") and p.parent != out]
    sources = {row["source"] for row in csv_rows(out / "splits.csv")}
    for stem, members in groups.items():
        kept = [m for m in members if str(m) in sources]
        assert len(kept) == 1, f"{stem}: {len(kept)} of its {len(members)} copies were kept: {kept}"
    assert len(sources) == len(groups) == len(written)
    report = json.loads((out / "report.json").read_text())
    assert len(report["duplicates"]) == len(groups) == len(result.duplicates)


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_decode_scale_does_not_change_the_hash():
    """The same photo saved at two sizes whose drafts land on different DCT scales hashes alike."""
    image = photo("coffee.png").resize((1200, 800), Image.LANCZOS)
    hashes = []
    for size in ((1200, 800), (560, 373)):  # drafted at 1/4 (300x200) and 1/1: 64 px drafts took 1/8 and 1/4
        buffer = io.BytesIO()
        image.resize(size, Image.LANCZOS).save(buffer, "JPEG", quality=90)
        hashes.append(file_hash(Image.open(buffer)))
    assert hamming(*hashes) <= 8
