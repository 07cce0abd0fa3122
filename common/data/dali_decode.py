"""DALI's CPU decoder as a checker: which files the DALI backends would fail on, and DALI's error in one line."""

from __future__ import annotations

import gc

import numpy as np

from common.errors import UserError


def require_dali():
    """The ``nvidia.dali`` module, or a UserError that says how to get it."""
    try:
        from nvidia import dali
    except ImportError:
        raise UserError(
            "the DALI backends need nvidia-dali (pip install nvidia-dali-cuda130); or use --data-backend pytorch"
        ) from None
    return dali


def dali_reason(error: Exception) -> str:
    """The line of a DALI pipeline error that says what went wrong (the rest is DALI's own traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1 :]
        lines = [line for line in after if "no longer valid" not in line] or lines
    return lines[0][:300] if lines else type(error).__name__


class _DecodeProbe:
    """Decodes batches of files with DALI's CPU decoder and says whether it failed; a DALI pipeline is dead
    after an error, so a new one is built after each failure."""

    def __init__(self, batch_size: int, workers: int):
        self.batch_size, self.workers, self.pipe = batch_size, max(1, workers), None

    def _build(self):
        dali = require_dali()

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self.workers, device_id=None,
                           prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)  # fmt: skip
        def probe():
            encoded = dali.fn.external_source(name="encoded")
            return dali.fn.decoders.image(encoded, device="cpu", output_type=dali.types.RGB)

        self.pipe = probe()
        self.pipe.build()

    def error(self, files: list[str]) -> str | None:
        try:
            data = [np.fromfile(f, dtype=np.uint8) for f in files]
        except OSError as e:
            return f"cannot read ({e})"
        if self.pipe is None:
            # The pipeline that failed is held by reference cycles through its exception's traceback: collect it
            # now, in this thread, rather than let the garbage collector tear it down later in the middle of
            # another pipeline's run (a rare segfault in CI was seen after a failed decode).
            gc.collect()
            self._build()
        try:
            self.pipe.feed_input("encoded", data)
            self.pipe.run()
            return None
        except RuntimeError as e:
            self.pipe = None
            return dali_reason(e)


def dali_undecodable(files: list[str], workers: int = 1, batch_size: int = 64, progress=None) -> dict[str, str]:
    """``{path: reason}`` for the files DALI's CPU decoder rejects: batches first, then file by file in a
    batch that failed, so a clean set costs one decode of each file. ``progress(done)`` is called per batch."""
    probe, bad = _DecodeProbe(batch_size, workers), {}
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        if probe.error(chunk) is not None:
            for f in chunk:
                why = probe.error([f])
                if why is not None:
                    bad[f] = f"DALI cannot decode it: {why}"
        if progress is not None:
            progress(start + len(chunk))
    return bad
