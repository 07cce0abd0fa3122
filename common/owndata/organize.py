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
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import torch

from common.checkpoint import atomic_write_text, checkpoint_sha256
from common.data import Normalizer, eval_transform
from common.errors import UserError
from common.owndata.collection import list_collection, read_batches
from common.owndata.progress import Progress

log = logging.getLogger("convnets")

COLUMNS = ["path", "class", "confidence", "status", "destination", "error"]
DECISIONS = "decisions.csv"
# Which checkpoint and threshold made the decisions: a later run into the same folder must be the same sorting.
SORTED_BY = "organize.json"


def read_decisions(path: Path, repair: bool = True) -> dict[str, dict]:
    """The rows of a decisions CSV by source path. A torn last line (a run killed mid-write) is ignored, and with
    ``repair`` cut off the file, which only the process that appends to it may do."""
    if not path.is_file():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        if repair:
            atomic_write_text(path, text)
            log.info("%s: cut off a torn last line (the previous run was interrupted while writing it)", path)
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and set(rows[0]) != set(COLUMNS):
        raise UserError(f"{path} is not a decisions file of predict --organize (columns {sorted(rows[0])})")
    return {row["path"]: row for row in rows}


def part_files(out: Path) -> list[Path]:
    """The per-rank decision files of a torchrun job (merged into decisions.csv when it ends)."""
    return sorted(out.glob("decisions.rank*.csv"))


def merge_decisions(out: Path) -> int:
    """Fold the per-rank files into ``decisions.csv`` (rewritten atomically, sorted by path), then remove them;
    returns how many rows the rank files held.

    A kill between the rewrite and the removals leaves rows in both places; reading dedupes them by path.
    """
    decisions = out / DECISIONS
    rows = read_decisions(decisions)
    parts = part_files(out)
    merged = 0
    for part in parts:
        part_rows = read_decisions(part, repair=False)
        merged += len(part_rows)
        rows |= part_rows
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[p] for p in sorted(rows))
    atomic_write_text(decisions, buffer.getvalue())
    for part in parts:
        part.unlink()
    return merged


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
    """Sort ``cfg.paths`` into ``cfg.organize/<class>/`` (or ``uncertain/<class>/`` below ``--min-confidence``).

    Under torchrun each rank takes its shard of the files not yet decided (``eval_shard``, as evaluation does)
    and appends to its own ``decisions.rank<r>.csv``; rank 0 merges them into ``decisions.csv`` at the end.
    """
    from common import distributed as dist

    runtime = dist.init_distributed(cfg.device)
    try:
        bad = organize_shard(cfg, runtime.device, runtime.rank, runtime.world_size)
        bad = sum(dist.all_gather_object(bad))
        dist.barrier()
        if runtime.is_main and (runtime.world_size > 1 or part_files(Path(cfg.organize))):
            merged = merge_decisions(Path(cfg.organize))
            log.info("merged %d decisions of the ranks into %s", merged, Path(cfg.organize) / DECISIONS)
    finally:
        dist.cleanup()
    return 1 if bad else 0


def check_same_sorting(out: Path, cfg, decided: int) -> dict | None:
    """Refuse to continue a folder another checkpoint or threshold sorted (its folders would mix two models'
    decisions, and the files already decided would not be looked at again); the record to write when there is none
    yet (else None)."""
    record = {"checkpoint": os.path.abspath(cfg.checkpoint), "checkpoint_sha256": checkpoint_sha256(cfg.checkpoint),
              "min_confidence": cfg.min_confidence}  # fmt: skip
    path = out / SORTED_BY
    if not path.is_file():
        if decided:
            log.warning("%s: %d images were sorted by an earlier run that did not record its checkpoint and "
                        "--min-confidence; continuing as if it used these", out, decided)  # fmt: skip
        return record
    try:
        earlier = json.loads(path.read_text())
        same = (earlier["checkpoint_sha256"], earlier["min_confidence"]) == (record["checkpoint_sha256"],
                                                                              record["min_confidence"])  # fmt: skip
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not the record organize writes ({e}); remove it only if you know which "
                        "checkpoint and --min-confidence sorted this folder") from None  # fmt: skip
    if not same:
        raise UserError(
            f"--organize {out} was sorted by {earlier['checkpoint']} with --min-confidence {earlier['min_confidence']} "
            f"(recorded in {path}); this run has {record['checkpoint']} with --min-confidence {cfg.min_confidence}, "
            "which would mix two sortings and skip the files already decided: pick a new output folder, or rerun "
            "with the earlier checkpoint and threshold to finish this one"
        )
    return None


def organize_shard(cfg, device: torch.device, rank: int = 0, world: int = 1) -> int:
    """Sort this rank's share of the files no earlier run decided; returns how many could not be read."""
    from common.data import eval_shard
    from common.distributed import barrier
    from common.inference import load_trained

    if cfg.chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {cfg.chunk_size}")
    if not 0 <= cfg.min_confidence <= 1:
        raise UserError(f"--min-confidence must be between 0 and 1, got {cfg.min_confidence}")
    out = Path(cfg.organize)
    out.mkdir(parents=True, exist_ok=True)
    trained = load_trained(cfg.checkpoint, device)
    if trained.multilabel:
        raise UserError(f"{cfg.checkpoint} is a multi-label model: --organize sorts each image into the one folder of "
                        "its class; use predict --csv for each image's labels")  # fmt: skip
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
    target = decisions if world == 1 else out / f"decisions.rank{rank}.csv"
    done = read_decisions(decisions, repair=world == 1)
    for part in part_files(out):  # an interrupted torchrun job's rows count as decided too
        done |= read_decisions(part, repair=part == target)
    pending = [f for f in files if f not in done]
    decided = len(files) - len(pending)
    sorted_by = check_same_sorting(out, cfg, decided)
    log.info("%s: %d images, %d sorted by an earlier run (%s), %d to go", base, len(files), decided, decisions,
             len(pending))  # fmt: skip
    # Every rank must shard the same list: none may append to its file before all have read theirs.
    barrier()
    if rank == 0 and sorted_by is not None:
        atomic_write_text(out / SORTED_BY, json.dumps(sorted_by, indent=2))
    pending = [pending[i] for i in eval_shard(len(pending), rank, world)]
    normalize = Normalizer(device, trained.pipeline.channels_last)
    progress = Progress(len(pending), "organizing" if world == 1 else f"organizing (rank {rank})")
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
            destination = folder / os.path.relpath(path, base)
            place(path, destination, cfg.copy)
            chunk.append([path, name, f"{confidence:.6f}", status, os.path.relpath(destination, out), ""])
            statuses[status] += 1
        count += len(batch.paths)
        if len(chunk) >= cfg.chunk_size:
            append_rows(target, chunk)
            chunk = []
        progress.update(count)
    if chunk:
        append_rows(target, chunk)
    progress.close()
    earlier = f" (this run; {decided} decided by earlier runs)" if decided else ""
    log.info("%s: %d sorted, %d uncertain (below %.2f), %d bad%s; every decision in %s", out, statuses["sorted"],
             statuses["uncertain"], cfg.min_confidence, statuses["bad"], earlier, target)  # fmt: skip
    return statuses["bad"]
