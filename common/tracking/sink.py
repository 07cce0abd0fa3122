"""What a sink is, and the records every sink gets: one global step, the parameters and the tags of a run.

A sink is TensorBoard or MLflow behind ``RunLogger`` (``log.json`` is the first sink and stays the reference):
each gets the same scalars at the same global step, the resolved configuration as parameters, the run's tags and
its artifacts. A sink never stops training: ``Tracker`` (in ``__init__``) turns off one that raises.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Protocol

log = logging.getLogger("convnets")

ROOT = Path(__file__).resolve().parents[2]


class Sink(Protocol):
    name: str

    def params(self, config: dict) -> None:
        """The resolved configuration (MLflow params, TensorBoard hparams)."""

    def tags(self, tags: dict) -> None:
        """What the run is: arch, recipe, data and its image count, git commit, device, world size."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Named values at one global step (see :func:`scalars_of`)."""

    def artifact(self, path: Path) -> None:
        """A file of the run (config.json, log.json, the confusion matrix, the best checkpoint)."""

    def state(self) -> dict:
        """What a resumed run needs to continue this sink's run (kept in the checkpoint)."""

    def close(self, status: str) -> None:
        """End of the run: FINISHED, FAILED or KILLED."""


def global_step(step: tuple, batches_per_epoch: int, last: int) -> tuple[str, int]:
    """(prefix, step) of a DLLogger step on the one axis every sink uses: training batches done (of one process).

    ``(epoch, i)`` is batch i of an epoch: ``step/`` at ``epoch * B + i``; ``(epoch,)`` is the epoch's summary:
    ``epoch/`` at the end of that epoch, ``(epoch + 1) * B``; ``()`` is the run's summary: ``final/`` at ``last``,
    the step of the last record before it. The prefixes keep the per-batch ``train.loss`` apart from the epoch's
    mean, and the one axis is what TensorBoard expects and what makes a resumed run's steps line up again.
    """
    if len(step) == 2:
        return "step", step[0] * batches_per_epoch + step[1]
    if len(step) == 1:
        return "epoch", (step[0] + 1) * batches_per_epoch
    return "final", last


def scalars_of(step, data: dict, batches_per_epoch: int, last: int) -> tuple[dict[str, float], int] | None:
    """The finite numbers of a ``log.json`` record, named ``<prefix>/<key>``, and their global step (None for a
    record that is not on the step axis, such as the ``PARAMETER`` ones)."""
    if not isinstance(step, tuple | list):
        return None
    prefix, at = global_step(tuple(step), batches_per_epoch, last)
    values = {
        f"{prefix}/{k}": float(v)
        for k, v in data.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    return values, at


def flat_params(config: dict) -> dict[str, str]:
    """The resolved configuration as strings (MLflow params are strings; TensorBoard shows them as given)."""
    return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in sorted(config.items())}


def git_commit() -> str | None:
    """The commit the code runs from: ``git rev-parse`` in a checkout, else $GIT_COMMIT (a container has no .git)."""
    if (ROOT / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10, check=True)  # fmt: skip
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return os.environ.get("GIT_COMMIT") or None


def run_tags(config: dict, recipe: str, train_images: int) -> dict[str, str]:
    """The tags of a run, written to log.json and to every sink."""
    tags = {
        "arch": config["arch"],
        "recipe": recipe,
        "data": str(Path(config["data"]).resolve()),
        "train_images": str(train_images),
        "device": config["device"],
        "world_size": str(config["world_size"]),
        "multilabel": str(config.get("multilabel", False)).lower(),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags
