"""``convnets predict --organize OUT COLLECTION``: sort an untagged collection into one folder per predicted class.

Every decision is a row of ``OUT/decisions.csv``, appended a chunk at a time in one write followed by fsync. A
run that is killed leaves at most a torn last line, which the next run cuts off before reading the file; it then
skips every file the CSV already holds, so a restart continues where the last chunk ended and no file gets two
rows. Files are placed before their rows are written, and placing is idempotent, so the files of a chunk lost
to the kill are simply placed again.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import torch

from common.checkpoint import atomic_write_text
from common.data import Normalizer, eval_transform
from common.distributed import resolve_device
from common.errors import UserError
from common.owndata.collection import list_collection, read_batches
from common.owndata.progress import Progress

log = logging.getLogger("convnets")

COLUMNS = ["path", "class", "confidence", "status", "destination", "error"]
DECISIONS = "decisions.csv"


def read_decisions(path: Path) -> dict[str, dict]:
    """The rows of a decisions CSV by source path, after cutting off a torn last line (a run killed mid-write)."""
    if not path.is_file():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        atomic_write_text(path, text)
        log.info("%s: cut off a torn last line (the previous run was interrupted while writing it)", path)
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and set(rows[0]) != set(COLUMNS):
        raise UserError(f"{path} is not a decisions file of predict --organize (columns {sorted(rows[0])})")
    return {row["path"]: row for row in rows}


def place(source: str, target: Path, copy: bool) -> None:
    """Link (or copy) ``source`` to ``target``, replacing whatever a killed run left there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not copy and os.path.samefile(source, target):
        return
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    if copy:
        shutil.copy2(source, tmp)
    else:
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(source, tmp)
    os.replace(tmp, target)


def append_rows(path: Path, rows: list[list]) -> None:
    """Append ``rows`` in one write, then fsync: the chunk reaches the disk whole or leaves a torn tail."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if not path.exists():
        writer.writerow(COLUMNS)
    writer.writerows(rows)
    with open(path, "a", newline="") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())


def run_organize(cfg) -> int:
    """Sort ``cfg.paths`` into ``cfg.organize/<class>/`` (or ``uncertain/<class>/`` below ``--min-confidence``)."""
    from common.inference import load_trained

    if cfg.chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {cfg.chunk_size}")
    if not 0 <= cfg.min_confidence <= 1:
        raise UserError(f"--min-confidence must be between 0 and 1, got {cfg.min_confidence}")
    out = Path(cfg.organize)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    trained = load_trained(cfg.checkpoint, device)
    doubt = "uncertain" if "uncertain" not in trained.classes else "_uncertain"
    files, base = list_collection(cfg.paths)
    inside = os.path.abspath(out) + os.sep
    if (base + os.sep).startswith(inside):
        raise UserError(f"--organize {out} must not hold the collection {base}")
    kept = [f for f in files if not f.startswith(inside)]
    if len(kept) < len(files):  # OUT inside the collection: its own links are not part of the collection
        log.info("left out %d file(s) below the output folder %s", len(files) - len(kept), out)
    files = kept
    decisions = out / DECISIONS
    done = read_decisions(decisions)
    pending = [f for f in files if f not in done]
    log.info("%s: %d images, %d sorted by an earlier run (%s), %d to go", base, len(files), len(files) - len(pending),
             decisions, len(pending))  # fmt: skip
    normalize = Normalizer(device, trained.pipeline.channels_last)
    progress = Progress(len(pending), "organizing")
    chunk, count, statuses = [], 0, Counter()
    for batch in read_batches(pending, eval_transform(trained.pipeline), cfg.batch_size, cfg.workers):
        probs = torch.empty(0, 0)
        if batch.good:
            with torch.no_grad():
                probs = trained.model(normalize(batch.images.to(device))).float().softmax(1).cpu()
        rows_of_good = dict(zip(batch.good, range(len(batch.good)), strict=True))
        for k, path in enumerate(batch.paths):
            if k in batch.errors:
                chunk.append([path, "", "", "bad", "", batch.errors[k]])
                statuses["bad"] += 1
                continue
            confidence, index = probs[rows_of_good[k]].max(0)
            confidence = round(float(confidence), 6)  # decide on the value the CSV records
            name = trained.classes[int(index)]
            status = "sorted" if confidence >= cfg.min_confidence else "uncertain"
            folder = out / name if status == "sorted" else out / doubt / name
            target = folder / os.path.relpath(path, base)
            place(path, target, cfg.copy)
            chunk.append([path, name, f"{confidence:.6f}", status, os.path.relpath(target, out), ""])
            statuses[status] += 1
        count += len(batch.paths)
        if len(chunk) >= cfg.chunk_size:
            append_rows(decisions, chunk)
            chunk = []
        progress.update(count)
    if chunk:
        append_rows(decisions, chunk)
    progress.close()
    log.info("%s: %d sorted, %d uncertain (below %.2f), %d bad; every decision in %s", out, statuses["sorted"],
             statuses["uncertain"], cfg.min_confidence, statuses["bad"], decisions)  # fmt: skip
    return 1 if statuses["bad"] else 0
