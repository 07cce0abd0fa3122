"""Run logging: DLLogger JSON lines to ``<output>/log.json`` and human lines on stdout, from rank 0 only.

dllogger is used when it is importable (the container installs it); otherwise the same ``DLLL {json}``
line format is written here, so tools that parse DLE logs read ours either way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

log = logging.getLogger("convnets")


def setup_stdout_logging(is_main: bool, stream=None) -> None:
    """Human-readable logging on stdout (``stream`` when stdout carries data); non-zero ranks only report
    warnings and errors."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(message)s" if is_main else "[rank %(rank)s] %(levelname)s %(message)s",
        stream=stream or sys.stdout,
        force=True,
    )
    # A reader that stops early (`| head`) closes the pipe: main() ends quietly, logging must not print
    # a traceback for each line it can no longer write.
    logging.raiseExceptions = False
    if not is_main:
        rank = os.environ.get("RANK", "?")
        old = logging.getLogRecordFactory()

        def factory(*args, **kwargs):
            record = old(*args, **kwargs)
            record.rank = rank
            return record

        logging.setLogRecordFactory(factory)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


class RunLogger:
    """Writes DLLogger lines ``DLLL {"timestamp", "datetime", "elapsedtime", "type", "step", "data"}``."""

    def __init__(self, path: Path | None, enabled: bool = True, tracker=None):
        """``tracker`` (common.tracking.Tracker, rank 0 only) gets every record too: TensorBoard, MLflow."""
        self.enabled = enabled
        self.tracker = tracker if enabled else None
        self.start = time.time()
        self.file = None
        self.dllogger = None
        if enabled and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                import dllogger  # installed in the container from NVIDIA's repository; not on PyPI
            except ImportError:
                dllogger = None  # (opening the file outside this handler: its errors are not chained to this one)
            if dllogger is not None:
                dllogger.init(backends=[dllogger.JSONStreamBackend(dllogger.Verbosity.VERBOSE, str(path), append=True)])
                self.dllogger = dllogger
            else:
                self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run

    def _write(self, kind: str, step, data: dict) -> None:
        if self.dllogger is not None:
            if kind == "METADATA":
                for key, meta in data.items():
                    self.dllogger.metadata(key, meta)
            else:
                self.dllogger.log(step=step, data=data, verbosity=self.dllogger.Verbosity.VERBOSE)
            self.dllogger.flush()
            return
        if self.file is None:
            return
        now = time.time()
        record = {
            "timestamp": now,
            "datetime": datetime.now().isoformat(sep=" "),
            "elapsedtime": now - self.start,
            "type": kind,
            "step": list(step) if isinstance(step, tuple) else step,
            "data": data,
        }
        self.file.write("DLLL " + json.dumps(record) + "\n")

    def metadata(self, key: str, meta: dict) -> None:
        if self.enabled:
            self._write("METADATA", "PARAMETER", {key: meta})
            if self.tracker is not None:
                self.tracker.metadata(key, meta)

    def log(self, step, data: dict, echo: bool = True) -> None:
        """Log ``data`` at ``step`` (a tuple like ``(epoch, iteration)`` or a string such as ``"PARAMETER"``)."""
        if not self.enabled:
            return
        self._write("LOG", step, data)
        if self.tracker is not None:
            self.tracker.log(step, data)
        if echo:
            where = " ".join(str(s) for s in step) if isinstance(step, tuple) else str(step)
            log.info("%s  %s", where, "  ".join(f"{k} {_format(v)}" for k, v in data.items()))

    def artifact(self, path: Path) -> None:
        """A file of the run for the sinks that keep files (MLflow's artifacts, TensorBoard's images)."""
        if self.tracker is not None:
            self.tracker.artifact(path)

    def tracking_state(self) -> dict:
        """What a resumed run needs to continue the sinks' runs (the MLflow run id), for the checkpoint."""
        return self.tracker.state() if self.tracker is not None else {}

    def close(self, status: str = "FINISHED", log_path: Path | None = None) -> None:
        """Flush and close log.json, then hand it (``log_path``) to the sinks and close them with ``status``."""
        if self.dllogger is not None:
            self.dllogger.flush()
            self.dllogger = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tracker is not None:
            if log_path is not None:
                self.tracker.artifact(log_path)
            self.tracker.close(status)
            self.tracker = None


def read_log(path: Path) -> list[dict]:
    """Parse a DLLogger file back into its records (for tests and reports)."""
    return [json.loads(line[5:]) for line in Path(path).read_text().splitlines() if line.startswith("DLLL ")]


class ProgressBar:
    """A one-line progress bar, drawn only when stdout is a terminal (logs stay clean in files and CI)."""

    def __init__(self, total: int, prefix: str, enabled: bool):
        self.total, self.prefix = total, prefix
        self.enabled = enabled and sys.stdout.isatty()

    def update(self, i: int, text: str = "") -> None:
        if self.enabled:
            filled = int(30 * i / max(1, self.total))
            sys.stdout.write(f"\r{self.prefix} [{'#' * filled}{'.' * (30 - filled)}] {i}/{self.total} {text}")
            sys.stdout.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()
