"""ImageFolder trees: list a split's image files, labels and classes."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError

log = logging.getLogger(__name__)

# Formats that both DALI's decoders and PIL read; GIF is left out because DALI cannot decode it.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")


@dataclass(frozen=True, eq=False)
class ImageList:
    """The files of one split, their labels (indices into ``classes``) and the class names.

    ``sizes``, when the start-up check has read them, is one (width, height) row per file in the displayed
    (EXIF-oriented) frame: the DALI feeder draws crop windows from it without opening a file.
    """

    root: Path
    files: list[str]
    labels: list[int]
    classes: list[str]
    sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.files)

    def without(self, bad: set[str]) -> ImageList:
        keep = [i for i, f in enumerate(self.files) if f not in bad]
        sizes = None if self.sizes is None else self.sizes[keep]
        return ImageList(self.root, [self.files[i] for i in keep], [self.labels[i] for i in keep], self.classes, sizes)

    def with_sizes(self, sizes: np.ndarray) -> ImageList:
        return dataclasses.replace(self, sizes=np.asarray(sizes, dtype=np.int32).reshape(len(self.files), 2))


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
