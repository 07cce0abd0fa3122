"""Time to accuracy (MLPerf's measure of training): ``--target-top1 X`` / ``--target-map X`` stop a run at the first
evaluation that reaches X, and log the epoch and the training time it took.

The time is the epoch loop's (training and evaluation, from the first epoch's start), summed over the attempts of a
resumed run as its checkpoints recorded it: the work a killed attempt lost after its last checkpoint is not
counted, as it is not in the model either. Start-up (imports, data checks, building the model) is not counted.
"""

from __future__ import annotations

import logging
import time

from common.errors import UserError

log = logging.getLogger("convnets")


class TimeToTarget:
    """The run's clock, and whether and when validation reached the target.

    Args:
        metric: ``top1`` or ``map`` (the score that also picks best.pt), None without a target.
        value: the target, in percent.
        elapsed_before: training seconds of the attempts before this one (the checkpoint's ``elapsed_s``).
        reached: the checkpoint's ``target`` entry, when an earlier attempt reached it.
    """

    def __init__(self, metric: str | None, value: float | None, elapsed_before: float = 0.0,
                 reached: dict | None = None):  # fmt: skip
        self.metric, self.value = metric, value
        self.elapsed_before = elapsed_before
        self.reached = reached
        self.started = time.perf_counter()

    @classmethod
    def from_config(cls, cfg, multilabel: bool, state: dict | None) -> TimeToTarget:
        """The target ``cfg`` asks for, checked against the data; ``state`` is the resumed checkpoint's."""
        if cfg.target_top1 is not None and multilabel:
            raise UserError("--target-top1: multi-label data has no top-1; use --target-map")
        if cfg.target_map is not None and not multilabel:
            raise UserError("--target-map is for multi-label data (labels.csv); use --target-top1")
        metric, value = ("top1", cfg.target_top1) if cfg.target_top1 is not None else ("map", cfg.target_map)
        state = state or {}
        reached = state.get("target")
        if reached and (value is None or reached.get("value") != value):
            reached = None  # another target (or none) this time: the run goes on
        return cls(metric if value is not None else None, value, float(state.get("elapsed_s", 0.0)), reached)

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def check(self, epoch: int, score: float) -> dict:
        """The ``target.*`` values to log when ``score`` (percent) reaches the target for the first time, else {}."""
        if self.metric is None or self.reached is not None or score < self.value:
            return {}
        self.reached = {"metric": self.metric, "value": self.value, "epoch": epoch, "seconds": self.elapsed()}
        return self.metrics()

    def metrics(self) -> dict:
        r = self.reached
        return {f"target.{r['metric']}": r["value"], "target.epoch": r["epoch"], "target.seconds": r["seconds"]}

    def state(self) -> dict:
        """For the checkpoint: the training time so far and, once reached, when."""
        return {"elapsed_s": self.elapsed(), **({"target": self.reached} if self.reached else {})}
