"""An untagged collection: its image files, where each one goes below an output folder, and decoded batches
read by DataLoader workers (bounded memory: a few batches in flight, whatever the collection's size)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from common.data import load_rgb
from common.errors import UserError


def list_collection(patterns: list[str]) -> tuple[list[str], str]:
    """The image files named by ``patterns`` (files, folders searched recursively, globs), absolute, sorted and
    unique, and the folder they are placed relative to (the common folder of the inputs)."""
    from common.inference import expand_paths

    files, roots = set(), []
    for path, error in expand_paths(patterns):
        if error:
            raise UserError(f"{path}: {error}")
        files.add(os.path.abspath(path))
    for pattern in patterns:
        roots.append(os.path.abspath(pattern) if os.path.isdir(pattern) else os.path.dirname(os.path.abspath(pattern)))
    files = sorted(files)
    base = os.path.commonpath(roots + [os.path.dirname(f) for f in files[:1]]) if files else os.getcwd()
    return files, base


class ImageFiles(torch.utils.data.Dataset):
    """``(index, uint8 CHW image or an empty tensor, error or "")`` per file: a bad file is reported, not raised."""

    def __init__(self, files: list[str], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_rgb(self.files[i])), ""
        except Exception as e:  # noqa: BLE001 - any decoding failure is recorded for this file only
            text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            return i, torch.empty(0, dtype=torch.uint8), f"cannot decode: {text}"


@dataclass
class Batch:
    paths: list[str]  # every file of the batch, in order
    images: torch.Tensor  # the decodable ones, stacked (uint8 NCHW)
    good: list[int]  # positions in ``paths`` of the rows of ``images``
    errors: dict[int, str]  # position -> why the file could not be read


def _collate(items):
    return items


def read_batches(files: list[str], transform, batch_size: int, workers: int) -> Iterator[Batch]:
    """Decoded batches of ``files`` in order, decoded by ``workers`` DataLoader processes (0: in this one)."""
    loader = torch.utils.data.DataLoader(ImageFiles(files, transform), batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate, prefetch_factor=2 if workers else None)  # fmt: skip
    for items in loader:
        good = [k for k, (_, image, error) in enumerate(items) if not error]
        images = torch.stack([items[k][1] for k in good]) if good else torch.empty(0, dtype=torch.uint8)
        yield Batch([files[i] for i, _, _ in items], images, good, {k: e for k, (_, _, e) in enumerate(items) if e})
