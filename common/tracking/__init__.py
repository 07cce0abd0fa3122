"""Experiment tracking: TensorBoard and MLflow as sinks behind ``RunLogger``, which writes ``log.json`` first.

``open_tracker`` makes the sinks a configuration asks for, on rank 0 only; ``Tracker`` hands every sink the same
records, mapped once to one global step, and turns off a sink that raises (with one warning) instead of letting
it stop the training. The MLflow sink sends from a thread of its own (``mlflow_sink.py``): nothing on the training
thread waits for a server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.errors import UserError
from common.tracking.sink import Sink, flat_params, global_step, run_tags, scalars_of

__all__ = ["Sink", "Tracker", "flat_params", "global_step", "open_tracker", "run_tags", "scalars_of"]

log = logging.getLogger("convnets")


class Tracker:
    """The sinks of one run, fed from ``RunLogger``: DLLogger steps become one global step, metadata records
    ``config`` and ``tags`` become parameters and tags."""

    def __init__(self, sinks: list[Sink], batches_per_epoch: int):
        self.sinks = list(sinks)
        self.batches_per_epoch = batches_per_epoch
        self.last_step = 0

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # noqa: BLE001 - a sink's failure (disk full, a library bug) is not the run's
                log.warning("%s: %s failed (%s: %s); this sink is off for the rest of the run", sink.name, method,
                            type(e).__name__, e)  # fmt: skip
                self.sinks.remove(sink)

    def metadata(self, key: str, meta: dict) -> None:
        if key == "config":
            self._each("params", meta)
        elif key == "tags":
            self._each("tags", meta)

    def log(self, step, data: dict) -> None:
        found = scalars_of(step, data, self.batches_per_epoch, self.last_step)
        if found is None:
            return
        values, at = found
        self.last_step = max(self.last_step, at)
        if values:
            self._each("scalars", values, at)

    def artifact(self, path: Path) -> None:
        if Path(path).is_file():
            self._each("artifact", Path(path))

    def state(self) -> dict:
        """Every sink's resume state, merged (the checkpoint's ``tracking`` entry)."""
        out: dict = {}
        for sink in self.sinks:
            out.update(sink.state())
        return out

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
        self.sinks = []


def resolve_tensorboard_dir(value: str | None, output: Path) -> Path | None:
    if value is None:
        return None
    return output / "tensorboard" if value == "auto" else Path(value)


def resolve_mlflow_uri(value: str | None) -> str | None:
    """``--mlflow URI``, or $MLFLOW_TRACKING_URI for ``--mlflow`` alone (MLflow's own convention)."""
    if value is None:
        return None
    if value != "auto":
        return value
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise UserError("--mlflow without a URI takes $MLFLOW_TRACKING_URI, which is not set: pass --mlflow URI "
                        "(e.g. http://mlflow.example:5000) or set the variable")  # fmt: skip
    return uri


def open_tracker(cfg, output: Path, batches_per_epoch: int, resumed: dict | None, resuming: bool) -> Tracker | None:
    """The sinks ``cfg`` asks for (None when it asks for none). Call on rank 0 only.

    Args:
        cfg: the run's TrainConfig (``tensorboard``, ``mlflow``, ``experiment``, ``run_name``, ...).
        output: the run folder (TensorBoard's default folder is in it).
        batches_per_epoch: training batches of one process per epoch (the global step's unit).
        resumed: the checkpoint's ``tracking`` entry when the run resumes from one (the MLflow run to continue).
        resuming: whether the run continues from a checkpoint (TensorBoard then skips the steps it holds).
    """
    sinks: list[Sink] = []
    tensorboard = resolve_tensorboard_dir(cfg.tensorboard, output)
    uri = resolve_mlflow_uri(cfg.mlflow)
    if tensorboard is not None:
        from common.tracking.tensorboard_sink import TensorBoardSink

        sinks.append(TensorBoardSink(tensorboard, resuming))
    if uri is not None:
        from common.tracking.mlflow_sink import MlflowSink

        resumed = resumed or {}
        run_id = resumed.get("mlflow_run_id")
        if run_id and resumed.get("mlflow_uri") != uri:
            log.info("mlflow: the checkpoint's run %s was logged to %s, not %s: starting a new run there", run_id,
                     resumed.get("mlflow_uri"), uri)  # fmt: skip
            run_id = None
        experiment = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "convnets"
        sinks.append(MlflowSink(uri, experiment, cfg.run_name or output.resolve().name, run_id, cfg.mlflow_timeout,
                                cfg.mlflow_model))  # fmt: skip
    return Tracker(sinks, batches_per_epoch) if sinks else None
