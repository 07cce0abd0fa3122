"""DALI's CPU decoder over a list of files, run as a script in a child process by :mod:`common.data.dali_decode`.

Reads ``{"files": [...], "workers": N, "batch_size": B}`` as JSON on stdin; writes one JSON line per batch,
``{"done": files_done, "bad": {path: reason}}``. It imports numpy and DALI only (no torch, no package ``common``):
it runs by path, and its start costs about a second.
"""

from __future__ import annotations

import gc
import json
import sys

import numpy as np


def dali_reason(error: Exception) -> str:
    """The line of a DALI pipeline error that says what went wrong (the rest is DALI's own traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines:
        after = lines[lines.index("encountered:") + 1 :]
        lines = [line for line in after if "no longer valid" not in line] or lines
    return lines[0][:300] if lines else type(error).__name__


class DecodeProbe:
    """Decodes batches of files with DALI's CPU decoder and says whether it failed; a DALI pipeline is dead
    after an error, so a new one is built after each failure."""

    def __init__(self, batch_size: int, workers: int):
        self.batch_size, self.workers, self.pipe = batch_size, max(1, workers), None

    def _build(self):
        from nvidia import dali

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
            # now, rather than let the garbage collector tear it down in the middle of another pipeline's run.
            gc.collect()
            self._build()
        try:
            self.pipe.feed_input("encoded", data)
            self.pipe.run()
            return None
        except RuntimeError as e:
            self.pipe = None
            return dali_reason(e)


def main() -> None:
    job = json.load(sys.stdin)
    files, batch_size = job["files"], job["batch_size"]
    probe = DecodeProbe(batch_size, job["workers"])
    for start in range(0, len(files), batch_size):
        chunk, bad = files[start : start + batch_size], {}
        if probe.error(chunk) is not None:  # a clean batch costs one decode of each file; a failed one, two
            for f in chunk:
                why = probe.error([f])
                if why is not None:
                    bad[f] = f"DALI cannot decode it: {why}"
        print(json.dumps({"done": start + len(chunk), "bad": bad}), flush=True)


if __name__ == "__main__":
    main()
