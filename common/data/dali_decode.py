"""DALI's CPU decoder as a checker: which files the DALI backends would fail on, and DALI's error in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common.data.dali_probe import dali_reason
from common.errors import UserError

__all__ = ["dali_reason", "dali_undecodable", "require_dali"]

# A batch whose decode crashes the child this many times in a row stops the check with its files named.
CRASH_TRIES = 3
PROBE_SCRIPT = Path(__file__).with_name("dali_probe.py")


def require_dali():
    """The ``nvidia.dali`` module, or a UserError that says how to get it."""
    try:
        from nvidia import dali
    except ImportError:
        raise UserError(
            "the DALI backends need nvidia-dali (pip install nvidia-dali-cuda130); or use --data-backend pytorch"
        ) from None
    return dali


def _probe(files: list[str], workers: int, batch_size: int, on_batch) -> tuple[int, str]:
    """Run :mod:`common.data.dali_probe` on ``files``; ``on_batch(done, bad)`` per batch it finished.
    Returns the child's exit status and the end of what it wrote on stderr."""
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a chatty child cannot block on it
        proc = subprocess.Popen(
            [sys.executable, str(PROBE_SCRIPT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
        try:
            proc.stdin.write(json.dumps({"files": files, "workers": workers, "batch_size": batch_size}))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died before reading: its status and stderr say why
        for line in proc.stdout:
            answer = json.loads(line)
            on_batch(answer["done"], answer["bad"])
        status = proc.wait()
        err.seek(0)
        return status, err.read()[-2000:]


def dali_undecodable(files: list[str], workers: int = 1, batch_size: int = 64, progress=None) -> dict[str, str]:
    """``{path: reason}`` for the files DALI's CPU decoder rejects: batches first, then file by file in a
    batch that failed, so a clean set costs one decode of each file. ``progress(done)`` is called per batch.

    The decoding runs in a child process. After a failed decode DALI tears its pipeline down, and now and then
    that crashed the process (a segfault in about 1 of 30 training start-ups on a folder with one such file):
    a crash costs the child, which is started again from the batch it was on, never the caller."""
    require_dali()
    bad: dict[str, str] = {}
    done, crashes = 0, 0
    while done < len(files):
        start = done

        def on_batch(n: int, found: dict[str, str], start: int = start) -> None:
            nonlocal done
            done = start + n
            bad.update(found)
            if progress is not None:
                progress(done)

        status, err = _probe(files[start:], workers, batch_size, on_batch)
        if done >= len(files):
            break
        crashes = crashes + 1 if done == start else 1
        if crashes >= CRASH_TRIES:
            raise UserError(
                f"DALI's decoder crashed {crashes} times (exit status {status}) on the {batch_size} files from "
                f"{files[done]} on; its last words:\n{err.strip() or '(none)'}\n"
                "Use --data-backend pytorch, or leave those files out."
            )
    return bad
