"""Atomic file writes: a crash leaves the old file or the new one, never a torn one. No torch here: the image-check
cache and the result files are written with these by commands that must not pay torch's import."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file in the same folder, fsync it, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one; a failing ``write``
    leaves the old file and no temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must reach the disk
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()))
