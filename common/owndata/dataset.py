"""``convnets prepare folder|csv``: a raw folder (one sub-folder per class) or a CSV of ``path,label`` rows made into
an ImageFolder data set that is safe to train and validate on.

Every file is decoded, by PIL and, where DALI is installed, by DALI's CPU decoder, the one the default backends
train with (bad ones are listed and left out; the verdicts of the written files go into DATA's image-check cache,
so training does not decode them again), exact and near duplicates are found before splitting
(one of each group is kept, so no image and its copy can sit on both sides of a split), and the split is
stratified by class over *units*: an image alone, or all the images one ``--group-by`` key ties together (frames
of one video). Only paths, sizes and 32-byte hashes are held in memory, never images.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
import re
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data import CheckCache, dali_undecodable, image_files, inspect_image, log_ignored
from common.data.checks import CACHE_NAME
from common.data.dali_decode import require_dali
from common.data.folders import LABEL_SEPARATOR, split_labels, write_labels_csv
from common.errors import UserError
from common.owndata.dedup import HASH_BYTES, UnionFind, duplicate_groups, file_hash
from common.owndata.progress import Progress

log = logging.getLogger("convnets")

SPLITS = ("train", "val", "test")


@dataclass
class Item:
    """One listed image: where it is, its class, and where it goes below ``<split>/<label>/``."""

    source: str
    label: str
    rel: str
    reason: str | None = None
    width: int = 0
    height: int = 0
    nbytes: int = 0


@dataclass
class Prepared:
    """What :func:`prepare_own` decided; the report is written from it."""

    mode: str
    source: str
    out: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    bad: dict[str, str]
    duplicates: list[dict]  # {"kept": path, "removed": [paths]}
    conflicts: list[dict]  # {"paths": [...], "labels": [...]}: one image under several classes, all left out
    warnings: list[str]
    settings: dict
    written: dict[str, int] = field(default_factory=dict)  # {"links": n, "copies": n}


def list_folder(src: Path) -> list[Item]:
    """``src/<class>/**/<image>``: one item per image file, labelled by its top-level folder."""
    if not src.is_dir():
        raise UserError(f"--src {src} is not a folder (expected one sub-folder per class)")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"--src {src} has no class sub-folders (expected {src}/<class>/<image>)")
    loose = [p.name for p in src.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        log.warning("%s: %d file(s) outside any class folder left out (e.g. %s)", src, len(loose), loose[0])
    items, ignored = [], Counter()
    for name in classes:
        files, other = image_files(src / name)
        ignored += other
        if not files:
            log.warning("%s: class folder %s holds no image; the class is left out", src, name)
        items += [Item(f, name, os.path.relpath(f, src / name)) for f in files]
    log_ignored(src, ignored)
    return items


def below(rel: str) -> str:
    """``rel``'s folders and name with no root, "." or "..": a path that stays below the folder it is joined to."""
    return os.path.join(*[part for part in Path(os.path.normpath(rel)).parts if part not in ("..", ".", os.sep)])


def list_csv(csv_path: Path, root: Path | None, multi_label: bool = False) -> tuple[list[Item], dict[str, str]]:
    """Rows ``path,label`` (a header row ``path,label`` or ``path,labels`` is optional); paths are relative to
    ``root`` or absolute.

    With ``multi_label`` a cell may hold several labels joined by ``;`` (or none: an image of no class), and
    rows repeating a path add their labels to it; an item's ``label`` is then its sorted labels joined by ``;``.
    Returns the items and ``{row: why}`` for rows that cannot be used (missing file, empty label, repeated path).
    """
    if not csv_path.is_file():
        raise UserError(f"--csv {csv_path} does not exist")
    root = root or csv_path.parent
    items, bad, seen = [], {}, {}  # seen: path -> (its item's index, its first row)
    kept_paths: set[str] = set()
    with open(csv_path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if n == 1 and [c.strip().lower() for c in row[:2]] in (["path", "label"], ["path", "labels"]):
                continue
            if len(row) < 2 and multi_label and row[0].strip():
                row = [row[0], ""]  # an image with none of the labels
            if len(row) < 2 or not row[0].strip() or (not row[1].strip() and not multi_label):
                bad[f"{csv_path}:{n}"] = f"expected 'path,label', got {','.join(row)!r}"
                continue
            rel, label = row[0].strip(), row[1].strip()
            path = os.path.normpath(os.path.join(root, rel))
            labels = split_labels(label) if multi_label else [label]
            odd = [x for x in labels if "/" in x or x.startswith(".")]
            if odd:
                bad[f"{csv_path}:{n}"] = f"label {odd[0]!r} cannot be a folder name"
                continue
            if path in seen and multi_label:
                # One row per (image, label), as many tools export them: the labels add up.
                item = items[seen[path][0]]
                item.label = LABEL_SEPARATOR.join(sorted(set(labels_of(item)) | set(labels)))
                continue
            if path in seen:
                first = items[seen[path][0]]
                hint = "" if first.label == label else " with another label (several labels per image: --multi-label)"
                bad[f"{csv_path}:{n}"] = f"{rel} is listed again{hint} (first on row {seen[path][1]})"
                continue
            seen[path] = len(items), n
            label = LABEL_SEPARATOR.join(labels)
            # Keep the path's folders below the class folder: two rows naming a/1.jpg and b/1.jpg stay apart. Without
            # "..": ../raw/x.jpg was written to train/<label>/../raw/x.jpg, a class "raw" (or outside the tree).
            kept = below(os.path.relpath(path, root) if not os.path.isabs(rel) else rel)
            if kept in kept_paths:  # ../a/1.jpg and a/1.jpg, once their ".." is gone
                stem, ext = os.path.splitext(kept)
                kept = f"{stem}.row{n}{ext}"
            kept_paths.add(kept)
            items.append(Item(path, label, kept))
    if not items and not bad:
        raise UserError(f"--csv {csv_path} has no rows")
    return items, bad


def _inspect(path: str) -> tuple[str | None, int, int, int, bytes | None]:
    """``(why it cannot be used or None, width, height, bytes, hash)``: runs in a worker process."""
    from PIL import Image

    if not os.path.isfile(path):
        return "no such file", 0, 0, 0, None
    reason, width, height = inspect_image(path, full=True)
    if reason:
        return reason, width, height, 0, None
    try:
        with Image.open(path) as im:
            digest = file_hash(im)
    except Exception as e:  # noqa: BLE001 - a file the check passed but hashing cannot read: left out, named
        return f"cannot hash ({type(e).__name__}: {e})", width, height, 0, None
    return None, width, height, os.path.getsize(path), digest


def inspect_all(items: list[Item], workers: int) -> np.ndarray:
    """Decode and hash every item in a process pool, filling ``reason``/size fields; the hashes, one row each."""
    hashes = np.zeros((len(items), HASH_BYTES), dtype=np.uint8)
    progress = Progress(len(items), "checking and hashing")
    paths = (item.source for item in items)
    if workers > 1:
        pool = multiprocessing.Pool(workers)
        results = pool.imap(_inspect, paths, chunksize=32)
    else:
        pool, results = None, map(_inspect, paths)
    try:
        for i, (reason, width, height, nbytes, digest) in enumerate(results):
            item = items[i]
            item.reason, item.width, item.height, item.nbytes = reason, width, height, nbytes
            if digest is not None:
                hashes[i] = np.frombuffer(digest, dtype=np.uint8)
            progress.update(i + 1)
    finally:
        if pool is not None:
            pool.terminate()
    progress.close()
    return hashes


def dali_check(items: list[Item], workers: int) -> bool:
    """Decode the items PIL passed with DALI's CPU decoder too, the one the default backends (dali-cpu, dali-gpu)
    train with: it refuses a few files PIL reads (16-bit BMP, 32-bit integer TIFF), and a file in DATA that the
    first epoch cannot read is worth leaving out now. Sets ``reason`` on those; False where DALI is not installed."""
    try:
        require_dali()
    except UserError:
        log.info("DALI is not installed: images checked with PIL only (a DALI training run checks them with DALI's "
                 "decoder at start-up)")  # fmt: skip
        return False
    good = [item for item in items if item.reason is None]
    progress = Progress(len(good), "checking with DALI's decoder")
    bad = dali_undecodable([item.source for item in good], workers, progress=progress.update)
    progress.close()
    for item in good:
        item.reason = bad.get(item.source)
    log.info("images checked with PIL and with DALI's decoder (the DALI backends'): %d file(s) only DALI refuses",
             len(bad))  # fmt: skip
    return True


def deduplicate(items: list[Item], hashes: np.ndarray, radius: int) -> tuple[list[int], list[dict], list[dict]]:
    """Indices of the items to keep (good, one per duplicate group), the groups, and cross-class conflicts.

    The kept copy of a group is the largest (pixels, then bytes); a group whose images carry different labels
    is left out entirely, since no one can tell which label is right.
    """
    good = [i for i, item in enumerate(items) if item.reason is None]
    groups = duplicate_groups(hashes[good], radius)
    drop, duplicates, conflicts = set(), [], []
    for group in groups:
        members = [items[good[g]] for g in group]
        labels = sorted({m.label for m in members})
        if len(labels) > 1:
            conflicts.append({"paths": [m.source for m in members], "labels": [m.label for m in members]})
            drop.update(good[g] for g in group)
            continue
        order = sorted(group, key=lambda g: (-items[good[g]].width * items[good[g]].height, -items[good[g]].nbytes,
                                             items[good[g]].source))  # fmt: skip
        duplicates.append({"kept": items[good[order[0]]].source, "removed": [items[good[g]].source for g in order[1:]]})
        drop.update(good[g] for g in order[1:])
    return [i for i in good if i not in drop], duplicates, conflicts


def labels_of(item: Item) -> list[str]:
    """An item's labels: its class, or for multi-label items the labels joined in ``label`` (maybe none)."""
    return split_labels(item.label)


def rarest_label(items: list[Item]):
    """The stratum of a multi-label item: its least frequent label, so that each rare label is dealt to every
    split in proportion (the usual simplification of iterative stratification); images without labels form
    their own stratum."""
    frequency = Counter(label for item in items for label in labels_of(item))
    return lambda item: min(labels_of(item), key=lambda x: (frequency[x], x), default="(no label)")


def group_pattern(group_by: str) -> re.Pattern:
    try:
        return re.compile(group_by)
    except re.error as e:
        raise UserError(f"--group-by {group_by!r} is not a valid regular expression: {e}") from None


def split_units(items: list[Item], keep: list[int], group_by: str | None) -> list[list[int]]:
    """The kept items gathered into units that must stay on one side of the split (``--group-by`` keys)."""
    uf = UnionFind(len(keep))
    if group_by:
        pattern = group_pattern(group_by)
        first: dict[str, int] = {}
        for k, i in enumerate(keep):
            m = pattern.search(items[i].rel) or pattern.search(items[i].source)
            if m:
                key = m.group(1) if m.groups() else m.group(0)
                uf.union(first.setdefault(key, k), k)
    return [[keep[k] for k in g] for g in uf.groups().values()]


def assign_splits(items: list[Item], units: list[list[int]], fractions: dict[str, float], seed: int,
                  warnings: list[str], stratum=None) -> dict[int, str]:  # fmt: skip
    """``{item index: split}``, stratified by class: each class's units are shuffled (by seed and class name, so a
    class's split does not change when another class is added) and dealt to val, then test, until each holds its
    fraction of the class's images; train gets the rest. A class with too few units for every split keeps train
    first, and says so. ``stratum`` (item -> key) replaces the class as the key, for multi-label items."""
    stratum = stratum or (lambda item: item.label)
    by_class: dict[str, list[list[int]]] = {}
    for unit in units:
        label = Counter(stratum(items[i]) for i in unit).most_common(1)[0][0]  # a unit spanning keys: its majority
        by_class.setdefault(label, []).append(unit)
    wanted = [s for s in ("val", "test") if fractions[s] > 0]
    out: dict[int, str] = {}
    for label in sorted(by_class):
        class_units = by_class[label]
        rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
        order = [class_units[j] for j in rng.permutation(len(class_units))]
        total = sum(len(u) for u in order)
        missing = wanted[len(order) - 1 :] if len(order) <= len(wanted) else []
        if missing:
            warnings.append(f"class {label!r} has {len(order)} image group(s): not enough for "
                            f"{' and '.join(missing)}, which will not contain it")  # fmt: skip
        pos = 0
        for split in wanted:
            if split in missing:
                continue
            target, taken = max(1, round(fractions[split] * total)), 0
            # Leave at least one unit for train.
            while taken < target and pos < len(order) - 1:
                for i in order[pos]:
                    out[i] = split
                taken += len(order[pos])
                pos += 1
        for unit in order[pos:]:
            for i in unit:
                out[i] = "train"
    return out


def _place(source: str, target: Path) -> bool:
    """Hard-link ``source`` at ``target`` (True), or copy it where links are impossible (False)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return True
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)
        return False


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pick another folder or pass --overwrite to replace it")


def prepare_own(cfg) -> Prepared:
    """Run ``prepare folder`` or ``prepare csv`` as configured by a ``PrepareOwnConfig``; returns what it did."""
    from common.owndata import require
    from common.owndata.report import write_report

    require("imagehash", "faiss")
    if cfg.out is None:
        raise UserError(f"prepare {cfg.dataset} needs --out DIR")
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise UserError(f"--val-fraction + --test-fraction must leave images for training, got "
                        f"{cfg.val_fraction} + {cfg.test_fraction}")  # fmt: skip
    if cfg.group_by:
        group_pattern(cfg.group_by)  # before the images are checked and hashed, not after
    if not 0 <= cfg.dup_radius <= 63:
        raise UserError(f"--dup-radius must be between 0 and 63 bits, got {cfg.dup_radius}")
    out = Path(cfg.out)
    check_out(out, cfg.overwrite)
    bad: dict[str, str] = {}
    multi = cfg.dataset == "csv" and cfg.multi_label
    if cfg.multi_label and not multi:
        raise UserError("--multi-label is for prepare csv (a folder gives each image the one class of its folder)")
    if cfg.dataset == "folder":
        if cfg.src is None:
            raise UserError("prepare folder needs --src RAW (one sub-folder per class)")
        source = cfg.src
        items = list_folder(Path(cfg.src))
    else:
        if cfg.csv is None:
            raise UserError("prepare csv needs --csv FILE (rows: path,label)")
        source = cfg.csv
        items, bad = list_csv(Path(cfg.csv), Path(cfg.root) if cfg.root else None, cfg.multi_label)
    # Out inside the source: the next prepare of the source would take the tree for a class and drop every image
    # as a copy under several classes. The source inside out: --overwrite would replace the source with the tree.
    src, dst = Path(source).resolve(), out.resolve()
    if src == dst or src in dst.parents:
        raise UserError(f"--out {out} must not be the source folder or inside it")
    if dst in src.parents:
        raise UserError(f"--out {out} holds the source {source}: pick an output folder outside it")
    log.info("%s: %d image files in %d classes", source, len(items), len({c for i in items for c in labels_of(i)}))

    hashes = inspect_all(items, cfg.workers)
    dali_checked = dali_check(items, cfg.workers)
    bad |= {item.source: item.reason for item in items if item.reason}
    keep, duplicates, conflicts = deduplicate(items, hashes, cfg.dup_radius)
    log.info("%d bad file(s) left out; %d duplicate group(s): %d copies removed; %d image(s) under several classes "
             "left out", len(bad), len(duplicates), sum(len(d["removed"]) for d in duplicates),
             sum(len(c["paths"]) for c in conflicts))  # fmt: skip
    warnings: list[str] = []
    units = split_units(items, keep, cfg.group_by)
    fractions = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    assigned = assign_splits(items, units, fractions, cfg.seed, warnings, rarest_label([items[i] for i in keep])
                             if multi else None)  # fmt: skip
    classes = sorted({c for i in keep for c in labels_of(items[i])})
    splits = ["train"] + [s for s in ("val", "test") if fractions[s] > 0]
    counts = {s: dict.fromkeys(classes, 0) for s in splits}
    for i, split in assigned.items():
        for label in labels_of(items[i]):
            counts[split][label] += 1
    for label in classes:
        n = sum(counts[s][label] for s in splits)
        if n < cfg.min_per_class:
            warnings.append(f"class {label!r} has only {n} images (fewer than {cfg.min_per_class}): expect a noisy "
                            "validation score for it; collect more if you can")  # fmt: skip

    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = Counter()
    # Training's start-up check reads verdicts from DATA's cache by (path, size, mtime): record those of every file
    # written (a hard link shares its source's inode, so its size and mtime; copy2 keeps the mtime).
    cache = CheckCache(tmp, load=False)
    progress = Progress(len(assigned), "writing")
    rows = []
    for n, (i, split) in enumerate(sorted(assigned.items(), key=lambda kv: items[kv[0]].source), start=1):
        item = items[i]
        # Multi-label: every image below <split>/images/, its labels in <split>/labels.csv.
        rel = os.path.join("images" if multi else item.label, item.rel)
        target = tmp / split / rel
        written["links" if _place(item.source, target) else "copies"] += 1
        cache.record_decoded(str(target), item.width, item.height, dali_checked)
        rows.append((os.path.join(split, rel), item.source, item.label, split))
        progress.update(n)
    progress.close()
    if multi:
        for split in splits:
            mine = [(os.path.relpath(path, split), split_labels(label)) for path, _, label, s in rows if s == split]
            write_labels_csv(tmp / split, mine)
    else:
        for split in splits:  # a class absent from a split still gets its (empty) folder: scan_split lists classes
            for label in classes:
                (tmp / split / label).mkdir(parents=True, exist_ok=True)
    with open(tmp / "splits.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "source", "label", "split"])
        writer.writerows(rows)
    settings = {k: getattr(cfg, k) for k in ("dataset", "src", "csv", "root", "val_fraction", "test_fraction", "seed",
                                             "group_by", "dup_radius", "min_per_class", "multi_label")}  # fmt: skip
    result = Prepared(cfg.dataset, str(source), str(out), classes, counts, dict(sorted(bad.items())), duplicates,
                      conflicts, warnings, settings, dict(written))  # fmt: skip
    write_report(result, tmp)
    cache.save()
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    for warning in warnings:
        log.warning("%s", warning)
    log.info("wrote %s (%d hard links, %d copies); report: %s; image verdicts cached in %s (checked with %s)",
             out, written["links"], written["copies"], out / "report.md", out / CACHE_NAME,
             "PIL and DALI" if dali_checked else "PIL")  # fmt: skip
    return result
