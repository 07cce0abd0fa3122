"""Atomic file writes: a crash leaves the old file or the new one, never a torn one. No torch here: the image-check
cache and the result files are written with these by commands that must not pay torch's import."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from common.errors import UserError, access_hint

# What atomic_write's temporary files are called: "." + the file's name + mkstemp's 8 random characters + ".tmp".
PARTIAL = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere setting and restoring it is the only way to read it
    (a moment in which another thread's new file would get mode 0o666 minus nothing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file in the same folder, fsync it, then rename it over ``path``, with the
    permissions a plain ``open(path, "w")`` would give it.

    A crash at any moment leaves either the old file or the new one, never a torn one; a failing ``write``
    leaves the old file and no temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file the caller writes, not a random temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        # mkstemp makes the file readable by its owner alone; the file it becomes gets the mode open() would give
        # it (0o644 under the usual umask): a checkpoint or export written by the image's user (uid 10001) is read
        # on the host, and one written on the host is mounted read-only into that user's container.
        os.fchmod(fd, 0o666 & ~_umask())
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


def ensure_writable(folder: Path, what: str, instead: str = "") -> None:
    """Create ``folder`` if needed and make (then remove) a file in it: a command whose result goes there fails at
    once, naming the folder, not after the work (a benchmark's measurement, a training's image check).

    Raises:
        UserError: naming ``what`` and the folder, with :func:`common.errors.access_hint` and ``instead``.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write {what} to {folder}: {e.strerror} ({access_hint()}){instead}") from None


def remove_partial_writes(folder: Path) -> list[Path]:
    """Remove the temporary files that writes killed mid-way left in ``folder`` (atomic_write's, by their names);
    call it only where no write into ``folder`` can be under way."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if PARTIAL.match(p.name) and p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
