"""Start-up image checks that scale: every file's verdict and displayed size, cached by (path, size, mtime).

A check decodes only what it has not seen: the cache beside the data (or, where the data folder is read-only,
under the user's cache directory) is shared by training, evaluation and ``convnets prepare --check``, so a second
run, a resume, or a check after a check opens only new or changed files. In a distributed run each rank checks
every ``world``-th file and an all-gather shares what they found, so start-up does not grow with the GPU count.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from common.atomic import atomic_write
from common.data.dali_decode import dali_undecodable
from common.data.folders import ImageList
from common.errors import UserError
from common.logger import ProgressBar

log = logging.getLogger(__name__)

DECODABLE_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "MPO"}
CACHE_NAME = ".convnets-check-cache.json.gz"
CACHE_VERSION = 1
# `--image-check auto` decodes everything when at most this many files are not yet fully checked (about 4
# minutes on 2 cores at the measured ~200 files/s per core), and reads headers only otherwise.
AUTO_FULL_LIMIT = 50_000
# EXIF orientations 5-8 rotate by 90 degrees: the displayed image is the stored one with width and height swapped.
_TRANSPOSED = {5, 6, 7, 8}
# Cache entry fields, stored as a list per file: [bytes, mtime_ns, width, height, pil_level, pil_why, dali, dali_why]
# pil_level: 1 = header read, 2 = fully decoded by PIL; dali: 1 = decoded by DALI's CPU decoder.
HEADER, FULL = 1, 2


def inspect_image(path: str, full: bool = True) -> tuple[str | None, int, int]:
    """``(why path cannot be decoded or None, width, height)``, the size as displayed (EXIF orientation applied).

    ``full`` decodes the whole image (catches truncation); JPEGs are decoded at 1/8 scale through
    ``draft``, which still reads every byte of the entropy stream but skips most of the arithmetic.
    """
    from PIL import Image, UnidentifiedImageError

    width = height = 0
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)", 0, 0
        with Image.open(path) as im:
            if im.format not in DECODABLE_FORMATS:
                return f"unsupported format {im.format}", 0, 0
            width, height = im.size
            if im.getexif().get(0x0112) in _TRANSPOSED:
                width, height = height, width
            if full:
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except UnidentifiedImageError:
        return "not an image", 0, 0
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})", 0, 0
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise OSError, SyntaxError, ValueError, struct.error...
        return f"cannot decode ({type(e).__name__}: {e})", width, height
    return None, width, height


def check_image(path: str, full: bool = True) -> str | None:
    """Why ``path`` cannot be decoded, or None when it can (see :func:`inspect_image`)."""
    return inspect_image(path, full)[0]


def format_bad(bad: dict[str, str], limit: int = 20) -> str:
    lines = [f"  {path}: {why}" for path, why in list(bad.items())[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The verdict cache


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "convnets"


class CheckCache:
    """Verdicts and sizes of the image files below ``root``, keyed by path relative to it, valid while the
    file's size and mtime are unchanged."""

    def __init__(self, root: str | Path, load: bool = True):
        self.root = os.path.abspath(root)
        self.prefix = self.root.rstrip(os.sep) + os.sep
        self.entries: dict[str, list] = {}
        self.changed = False
        digest = hashlib.sha1(os.path.realpath(self.root).encode()).hexdigest()[:16]
        self.paths = [Path(self.root) / CACHE_NAME, user_cache_dir() / f"check-cache-{digest}.json.gz"]
        for path in self.paths if load else []:
            try:
                with gzip.open(path, "rt") as f:
                    data = json.load(f)
            except FileNotFoundError:
                continue
            except (OSError, EOFError, ValueError) as e:  # torn or foreign file: start again, it is only a cache
                log.info("ignoring the image-check cache %s (%s)", path, e)
                continue
            if data.get("version") == CACHE_VERSION:
                self.entries = data["entries"]
                self.loaded_from = path
                break

    def key(self, path: str) -> str:
        if not path.startswith(self.prefix):  # a relative --data: the same key as its absolute spelling
            path = os.path.abspath(path)
        return path[len(self.prefix) :] if path.startswith(self.prefix) else path

    def lookup(self, path: str, stat: tuple[int, int]) -> list | None:
        entry = self.entries.get(self.key(path))
        return entry if entry is not None and (entry[0], entry[1]) == stat else None

    def record_decoded(self, path: str, width: int, height: int, dali: bool) -> None:
        """Record that ``path`` (displayed ``width`` x ``height``) decodes fully with PIL, and with DALI's CPU
        decoder when ``dali``, as :func:`check_files` would: ``convnets prepare`` checked it, so training need not."""
        self.update({self.key(path): [*_stat(path), width, height, FULL, None, int(dali), None]})

    def update(self, new: dict[str, list]) -> None:
        if new:
            self.entries.update(new)
            self.changed = True

    def save(self) -> Path | None:
        """Write atomically beside the data, or under the user's cache directory where that fails."""
        if not self.changed:
            return None
        payload = gzip.compress(json.dumps({"version": CACHE_VERSION, "root": self.root, "entries": self.entries},
                                           separators=(",", ":")).encode(), compresslevel=1)  # fmt: skip
        for path in self.paths:
            try:
                atomic_write(path, lambda f: f.write(payload))
            except OSError:
                continue  # read-only data folder: try the next place
            self.changed = False
            return path
        log.warning("could not write the image-check cache to %s", " or ".join(map(str, self.paths)))
        return None


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


class _Progress:
    """A line in the log every ``every`` seconds with the rate and the time left, and a bar on a terminal."""

    def __init__(self, total: int, what: str, every: float = 10.0):
        self.total, self.what, self.every = total, what, every
        self.start = self.last = time.monotonic()
        self.bar = ProgressBar(total, what, enabled=total > 0)

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        text = f"{rate:.0f} files/s, {eta / 60:.1f} min left"
        self.bar.update(done, text)
        if now - self.last >= self.every and done < self.total:
            self.last = now
            log.info("%s: %d/%d files, %s", self.what, done, self.total, text)

    def close(self) -> None:
        self.bar.close()


def _pil_pass(files: list[str], full: bool, workers: int) -> list[tuple[str | None, int, int]]:
    if not files:
        return []
    progress, out, chunk = (
        _Progress(len(files), "image check (PIL " + ("decode" if full else "headers") + ")"),
        [],
        4096,
    )
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(files) > 2000 else None
    try:
        for start in range(0, len(files), chunk):
            part = files[start : start + chunk]
            if pool is None:
                out += [inspect_image(f, full) for f in part]
            else:
                out += list(pool.map(inspect_image, part, [full] * len(part), chunksize=64))
            progress(len(out))
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown()
    return out


def check_files(files: list[str], mode: str, dali: bool, workers: int, cache: CheckCache | None = None):
    """Check ``files`` (``mode`` ``full`` or ``header``), decoding only what ``cache`` has no verdict for.

    Returns ``(bad, sizes, new)``: ``{path: reason}``, an int32 array of displayed (width, height) per file
    (0 for an unreadable one), and the cache entries this call created or extended.

    PIL reads every header (and, with ``full`` and not ``dali``, decodes every image). With ``dali`` the full
    decode is DALI's own CPU decoder, the one the DALI backends train with: a few files PIL reads DALI
    rejects (16-bit BMP, 32-bit integer TIFF), and the check must reject them too.
    """
    cache = cache or CheckCache(".", load=False)
    pil_level = FULL if mode == "full" and not dali else HEADER
    need_dali = mode == "full" and dali
    stats = [_stat(f) for f in files]
    entries = [cache.lookup(f, s) for f, s in zip(files, stats, strict=True)]
    new: dict[str, list] = {}
    todo = [i for i, e in enumerate(entries) if e is None or (e[4] < pil_level and e[5] is None)]
    for i, (why, w, h) in zip(todo, _pil_pass([files[i] for i in todo], pil_level == FULL, workers), strict=True):
        old = entries[i]
        entry = [*stats[i], w, h, pil_level, why, 0, None]
        if old is not None and why is None:  # a header read after a DALI decode keeps the DALI verdict
            entry[6:] = old[6:]
        entries[i] = new[cache.key(files[i])] = entry
    if need_dali:
        todo = [i for i, e in enumerate(entries) if e[5] is None and not e[6]]
        if todo:
            progress = _Progress(len(todo), "image check (DALI decode)")
            bad = dali_undecodable([files[i] for i in todo], workers, progress=progress)
            progress.close()
            for i in todo:
                entry = list(entries[i])
                entry[6:] = [1, bad.get(files[i])]
                entries[i] = new[cache.key(files[i])] = entry
    bad = {}
    for f, e in zip(files, entries, strict=True):
        why = e[5] or (e[7] if dali else None)
        if why is not None:
            bad[f] = why
    sizes = np.array([(e[2], e[3]) for e in entries], dtype=np.int32).reshape(len(files), 2)
    return bad, sizes, new


def find_bad_images(files: list[str], full: bool = True, workers: int = 1, dali: bool = False,
                    cache: CheckCache | None = None) -> dict[str, str]:  # fmt: skip
    """Check every file; returns ``{path: reason}`` for those that cannot be decoded (see :func:`check_files`)."""
    bad, _, new = check_files(files, "full" if full else "header", dali, workers, cache)
    if cache is not None:
        cache.update(new)
    return dict(sorted(bad.items()))


SPLIT_NAMES = ("train", "val", "test")


def _cache_root(splits: list[ImageList]) -> str:
    """The data root the splits share (``DATA`` for ``DATA/train`` and ``DATA/val``); a lone split named like one
    (``evaluate --data DATA`` checks ``DATA/val``) shares its root's cache with training."""
    roots = [os.path.abspath(images.root) for images in splits]
    if len(roots) > 1:
        return os.path.commonpath(roots)
    return os.path.dirname(roots[0]) if os.path.basename(roots[0]) in SPLIT_NAMES else roots[0]


def resolve_check_mode(mode: str, uncached: int, total: int) -> tuple[str, str]:
    """``auto`` -> ``full`` when few files need a decode, else ``header``; returns (mode, the reason in words)."""
    if mode != "auto":
        return mode, f"--image-check {mode}"
    if uncached == 0:
        return "full", f"all {total} files have a cached verdict"
    if uncached <= AUTO_FULL_LIMIT:
        return "full", f"{uncached} of {total} files not yet checked (a full check is cheap under {AUTO_FULL_LIMIT})"
    return "header", (
        f"{uncached} of {total} files not yet decoded, too many for a start-up check; headers only "
        "(run `convnets prepare --check DATA` once, or pass --image-check full, to decode them all)"
    )


def drop_bad_images(splits: list[ImageList], mode: str, skip_bad: bool, workers: int, dali: bool = False,
                    rank: int = 0, world: int = 1, gather=lambda found: [found]) -> list[ImageList]:  # fmt: skip
    """Stop with the list of undecodable files of every split at once, or leave them out with one warning
    when ``skip_bad``; returns the splits without them, each with its files' displayed sizes.

    ``mode`` is ``full``, ``header``, ``auto`` (full when cheap, see :func:`resolve_check_mode`) or ``none``.
    In a distributed run each rank checks every ``world``-th file and ``gather`` (an all-gather of objects)
    shares what they found; only rank 0 writes the cache.
    """
    if mode == "none":
        return splits
    cache = CheckCache(_cache_root(splits))
    shares = [images.files[rank::world] for images in splits]
    if mode == "auto":
        uncached = 0
        for share in shares:
            for f in share:
                e = cache.lookup(f, _stat(f))
                uncached += e is None or (e[5] is None and (not e[6] if dali else e[4] < FULL))
        uncached = sum(gather(uncached))
        total = sum(len(images) for images in splits)
        mode, why = resolve_check_mode(mode, uncached, total)
        if rank == 0:
            log.info("image check: %s (%s)", mode, why)
    found = {"bad": {}, "sizes": [], "new": {}}
    for share in shares:
        bad, sizes, new = check_files(share, mode, dali, workers, cache)
        found["bad"] |= bad
        found["sizes"].append(sizes)
        found["new"] |= new
    parts = gather(found)
    splits = [images.with_sizes(_interleave([p["sizes"][s] for p in parts], len(images)))
              for s, images in enumerate(splits)]  # fmt: skip
    if rank == 0:
        for part in parts:
            cache.update(part["new"])
        cache.save()
    bad = dict(sorted(item for part in parts for item in part["bad"].items()))
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


def _interleave(parts: list[np.ndarray], n: int) -> np.ndarray:
    """Undo ``files[rank::world]``: rank r's rows go to positions r, r + world, ..."""
    out = np.zeros((n, 2), dtype=np.int32)
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out
