"""ImageFolder trees: list a split's image files, labels and classes."""

from __future__ import annotations

import csv
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
    """The files of one split, their labels and the class names.

    A label is an index into ``classes``; in a multi-label split (``multilabel``) it is a row of 0/1 per class
    (uint8), which the loaders batch as float targets for a sigmoid head.
    ``sizes``, when the start-up check has read them, is one (width, height) row per file in the displayed
    (EXIF-oriented) frame: the DALI feeder draws crop windows from it without opening a file.
    """

    root: Path
    files: list[str]
    labels: list
    classes: list[str]
    sizes: np.ndarray | None = None
    multilabel: bool = False

    def __len__(self) -> int:
        return len(self.files)

    def class_counts(self) -> list[int]:
        """Images per class (an image with several labels counts for each)."""
        if self.multilabel:
            return np.asarray(self.labels, np.int64).reshape(-1, len(self.classes)).sum(0).tolist()
        return np.bincount(np.asarray(self.labels, np.int64), minlength=len(self.classes)).tolist()

    def without(self, bad: set[str]) -> ImageList:
        keep = [i for i, f in enumerate(self.files) if f not in bad]
        sizes = None if self.sizes is None else self.sizes[keep]
        return dataclasses.replace(self, files=[self.files[i] for i in keep], labels=[self.labels[i] for i in keep],
                                   sizes=sizes)  # fmt: skip

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
    if (split_dir / LABELS_CSV).is_file():
        return read_multilabel_split(split_dir, classes)
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


# A multi-label split: the images anywhere below the split folder and one row per image in ``labels.csv``.
LABELS_CSV = "labels.csv"
LABEL_SEPARATOR = ";"


def split_labels(cell: str) -> list[str]:
    """The labels of a ``labels.csv`` cell (``"cat;dog"``), sorted, without blanks or repeats."""
    return sorted({x.strip() for x in cell.split(LABEL_SEPARATOR) if x.strip()})


def write_labels_csv(split_dir: Path, rows) -> None:
    """``split_dir/labels.csv`` from ``(path below split_dir, labels)`` rows, the labels a list of names."""
    with open(Path(split_dir) / LABELS_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels"])
        writer.writerows((path, LABEL_SEPARATOR.join(labels)) for path, labels in rows)


def read_multilabel_split(split_dir: Path, classes: list[str] | None = None) -> ImageList:
    """``split_dir/labels.csv`` with rows ``path,labels``: the path relative to ``split_dir``, the labels joined
    by ``;`` (an empty cell: an image with none of the classes). Classes default to the sorted labels found.

    Raises:
        UserError: a row names a missing file, a path twice, or (with ``classes``) a label outside them.
    """
    csv_path = split_dir / LABELS_CSV
    rows: list[tuple[str, list[str]]] = []
    problems, seen = [], set()
    with open(csv_path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "labels"]):
                continue
            rel = row[0].strip()
            labels = split_labels(row[1] if len(row) > 1 else "")
            path = split_dir / rel
            if not rel or rel in seen:
                problems.append(f"row {n}: {'empty path' if not rel else f'{rel} listed again'}")
            elif not path.is_file():
                problems.append(f"row {n}: {path} does not exist")
            else:
                seen.add(rel)
                rows.append((str(path), labels))
    rows.sort()  # the same order as an ImageFolder split's, whatever the CSV's
    if problems:
        raise UserError(f"{csv_path}: {len(problems)} bad row(s): " + "; ".join(problems[:10]))
    if not rows:
        raise UserError(f"{csv_path} lists no image (expected rows 'path,labels' with labels joined by ';')")
    found = sorted({label for _, labels in rows for label in labels})
    classes = found if classes is None else list(classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{csv_path} has labels that are not among the training classes: {', '.join(unknown[:10])}")
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), np.uint8)
    for i, (_, labels) in enumerate(rows):
        targets[i, [index[label] for label in labels]] = 1
    return ImageList(split_dir, [p for p, _ in rows], list(targets), classes, multilabel=True)
