"""MLflow: a run on a tracking server (or store), fed from a thread of its own.

MLflow's client blocks, and raises when the server is away; the training thread only appends to a bounded queue
here, and one sender thread delivers it: metric points coalesced into ``log_batch`` calls of up to 1,000, each
point stamped when it was logged, so that a retried batch the server had in fact taken is not stored twice (the
server skips exact duplicates). A server that is down at the start or goes away later costs one warning; what is
logged meanwhile waits in the queue (up to ``QUEUE_POINTS`` points, then the newest are dropped and counted) and
is sent when the server is back. The end of the run waits ``timeout_s`` for the queue to empty, then says in one
line what did not reach the server. A request that fails otherwise (a 4xx: a bad value) is left out with a warning.

A resumed run continues the checkpoint's run. The killed attempt may have sent steps past its last checkpoint,
which the resumed run trains again: MLflow keeps every (step, value) it is sent and cannot take one back, so the
sender first reads the steps the run holds and sends only the others (the TensorBoard sink does the same, so both
hold the same numbers; see ``tensorboard_sink.py``). Parameters are immutable in MLflow: a resumed run keeps the
first values, and one line names those this command changed.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError

log = logging.getLogger("convnets")

QUEUE_POINTS = 200_000  # metric points kept while the server is away (a few tens of MB)
BATCH_METRICS, BATCH_PARAMS = 1000, 100  # MLflow's limits per log_batch
MAX_BACKOFF_S = 30.0
# The client's own retries (7, with exponential backoff: minutes) would hold the sender on one request while the
# queue could already be sent elsewhere or counted; this sink retries itself. A user's own settings win.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@dataclass
class Item:
    kind: str  # metrics, params, tags, artifact, model, end
    payload: object = None
    points: int = 0


@dataclass
class Delivery:
    """What reached the server and what did not, for the run's last line."""

    sent_points: int = 0
    refused: list[str] = field(default_factory=list)
    dropped_full: int = 0


def is_outage(error: BaseException) -> bool:
    """Whether the server did not answer (refused, reset, timed out) or answered that it cannot now (5xx, 429):
    worth retrying. Anything else (a 4xx, a bad value, a local failure) would fail again."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    cause: BaseException | None = error
    while cause is not None:  # MLflow wraps the requests error it caught: it is the context of its own
        if isinstance(cause, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError):
            return True
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, RestException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    # A response that was not MLflow's JSON (a proxy's 502 page): "failed with error code 502 != 200".
    found = re.search(r"error code (\d{3}) != 200", str(error)) if isinstance(error, MlflowException) else None
    return bool(found) and (int(found.group(1)) >= 500 or found.group(1) == "429")


def check_uri(uri: str):
    """An MlflowClient for ``uri``; a URI MLflow has no store for is a UserError now, not a warning per step."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise UserError(f"--mlflow needs the mlflow package ({e}): pip install -e '.[tracking]'") from None
    if "://" not in uri and not uri.startswith(("databricks", "/")):
        raise UserError(f"--mlflow {uri!r} is not a URI: give a scheme, e.g. http://{uri} (a server), "
                        "sqlite:///path/mlflow.db or file:///path (a local store)")  # fmt: skip
    scheme = uri.split("://", 1)[0]
    if scheme in ("http", "https") and not uri.split("://", 1)[1].strip("/"):
        raise UserError(f"--mlflow {uri!r} names no host")
    try:
        client = MlflowClient(tracking_uri=uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own and SQLAlchemy's errors for a bad store URI
        raise UserError(f"--mlflow {uri!r}: MLflow cannot use this tracking URI: {e}") from None
    mlflow.set_tracking_uri(uri)  # for mlflow.pytorch.log_model, which takes the fluent API's URI
    return client


class MlflowSink:
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None, timeout_s: float,
                 log_model: bool):  # fmt: skip
        for key, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.client = check_uri(uri)
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.run_id = run_id
        self.resuming = run_id is not None
        self.timeout_s, self.log_model = timeout_s, log_model
        self.queue: collections.deque[Item] = collections.deque()
        self.queued_points = 0
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.attached = threading.Event()
        self.tried = threading.Event()  # the first attempt to reach the server is over, whatever its outcome
        self.delivery = Delivery()
        self.held_metrics: set[tuple[str, int]] = set()
        self.held_params: dict[str, str] = {}
        self.tags_to_set: dict[str, str] = {}
        self.down_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="mlflow-sink", daemon=True)
        self.thread.start()
        # A reachable server answers in well under a second: then the run id is known before the first checkpoint
        # (which keeps it for a resume). An unreachable one is the sender thread's to wait for, not the training's.
        self.tried.wait(timeout=10)

    # ---- the training thread's side: append only

    def _put(self, item: Item) -> None:
        with self.cond:
            if item.points and self.queued_points + item.points > QUEUE_POINTS:
                self.delivery.dropped_full += item.points
                return
            self.queue.append(item)
            self.queued_points += item.points
            self.cond.notify()

    def params(self, config: dict) -> None:
        from common.tracking.sink import flat_params

        self._put(Item("params", flat_params(config)))

    def tags(self, tags: dict) -> None:
        mlflow_tags = dict(tags)
        if "git_commit" in tags:  # MLflow's own name, which its UI shows as the run's source version
            mlflow_tags["mlflow.source.git.commit"] = tags["git_commit"]
        self._put(Item("tags", mlflow_tags))

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # stamped here, once: a retry sends the same point, which the server skips
        self._put(Item("metrics", [Metric(k, v, now, step) for k, v in values.items()], points=len(values)))

    def artifact(self, path: Path) -> None:
        if path.suffix == ".pt":
            # A checkpoint is large: it goes only with --mlflow-model, and as a model a registry can hold.
            if self.log_model:
                self._put(Item("model", Path(path)))
            return
        self._put(Item("artifact", Path(path)))

    def state(self) -> dict:
        return {"mlflow_run_id": self.run_id, "mlflow_uri": self.uri} if self.run_id else {}

    def close(self, status: str) -> None:
        self._put(Item("end", status))
        self.thread.join(self.timeout_s)
        self.stop.set()
        with self.cond:
            left = list(self.queue)
            self.cond.notify()
        points = sum(i.points for i in left) + self.delivery.dropped_full
        others = [i.kind for i in left if i.kind not in ("metrics", "end")]
        if self.thread.is_alive() or left:
            since = time.strftime("%H:%M:%S", time.localtime(self.down_since)) if self.down_since else "?"
            log.warning("mlflow: %d metric point(s)%s not delivered to %s (unreachable since %s, waited %.0f s): "
                        "dropped; %d point(s) reached run %s; log.json holds everything", points,
                        f" and {len(others)} other record(s) ({', '.join(others)})" if others else "", self.uri,
                        since, self.timeout_s, self.delivery.sent_points, self.run_id)  # fmt: skip
        elif self.delivery.dropped_full:
            log.warning("mlflow: %d metric point(s) dropped while the server was away (queue full at %d); %d "
                        "reached run %s", self.delivery.dropped_full, QUEUE_POINTS, self.delivery.sent_points,
                        self.run_id)  # fmt: skip
        else:
            log.info("mlflow: run %s %s, %d metric point(s) delivered", self.run_id, status.lower(),
                     self.delivery.sent_points)  # fmt: skip
        if self.delivery.refused:
            log.warning("mlflow: the server refused %d request(s): %s", len(self.delivery.refused),
                        "; ".join(self.delivery.refused[:3]))  # fmt: skip

    # ---- the sender thread

    def _next(self) -> Item | None:
        """The next item, metric items merged up to a batch; None once ``close`` has given up."""
        with self.cond:
            while not self.queue and not self.stop.is_set():
                self.cond.wait()
            if self.stop.is_set():
                return None
            item = self.queue[0]
            if item.kind != "metrics":
                return item
            merged = []
            for queued in self.queue:
                if queued.kind != "metrics" or len(merged) + queued.points > BATCH_METRICS and merged:
                    break
                merged.extend(queued.payload)
            return Item("metrics", merged, points=len(merged))

    def _done(self, item: Item) -> None:
        """Take what ``item`` covered off the queue."""
        with self.cond:
            if item.kind != "metrics":
                self.queue.popleft()
                return
            left = item.points
            while left > 0:
                head = self.queue.popleft()
                left -= head.points
                self.queued_points -= head.points

    def _run(self) -> None:
        backoff = 1.0
        while not self.stop.is_set():
            try:
                if not self.attached.is_set():
                    try:
                        self._attach()
                    finally:
                        self.tried.set()
                item = self._next()
                if item is None:
                    return
                self._send(item)
                self._done(item)
                if self.down_since is not None:
                    log.warning("mlflow: %s is reachable again; sending what was kept", self.uri)
                    self.down_since = None
                backoff = 1.0
                if item.kind == "end":
                    return
            except Exception as e:  # noqa: BLE001 - whatever the client raises, training goes on
                if not is_outage(e):
                    if not self.attached.is_set():
                        log.warning("mlflow: cannot use %s (%s): no MLflow run; training and the other sinks go on",
                                    self.uri, _short(e))  # fmt: skip
                        return  # what was queued is counted as not delivered at the end
                    item = self._next()  # the item that failed: left out, the others go on
                    if item is not None:
                        self.delivery.refused.append(f"{item.kind}: {_short(e)}")
                        self._done(item)
                    continue
                if self.down_since is None:
                    self.down_since = time.time()
                    log.warning("mlflow: cannot reach %s (%s); training goes on, records are kept and sent when it "
                                "is back", self.uri, _short(e))  # fmt: skip
                if self.stop.wait(backoff):
                    return
                backoff = min(2 * backoff, MAX_BACKOFF_S)

    def _attach(self) -> None:
        """Find the resumed run (reading what it holds) or start a new one."""
        from mlflow.exceptions import MlflowException

        if self.run_id is not None:
            try:
                run = self.client.get_run(self.run_id)
            except MlflowException as e:
                if is_outage(e):
                    raise
                log.warning("mlflow: the checkpoint's run %s is not on %s (%s): starting a new run", self.run_id,
                            self.uri, _short(e))  # fmt: skip
                self.run_id = None
            else:
                self.held_params = dict(run.data.params)
                self.held_metrics = {(key, m.step) for key in run.data.metrics
                                     for m in self.client.get_metric_history(self.run_id, key)}  # fmt: skip
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("mlflow: continuing run %s at %s (%d metric points held)", self.run_id, self.uri,
                         len(self.held_metrics))  # fmt: skip
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None:
                try:
                    experiment_id = self.client.create_experiment(self.experiment)
                except MlflowException:  # another run created it meanwhile
                    experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
            else:
                experiment_id = experiment.experiment_id
            run = self.client.create_run(experiment_id, run_name=self.run_name,
                                         tags={"mlflow.source.name": "convnets train"})  # fmt: skip
            self.run_id = run.info.run_id
            log.info("mlflow: run %s in experiment %r at %s", self.run_id, self.experiment, self.uri)
        self.attached.set()

    def _send(self, item: Item) -> None:
        from mlflow.entities import Param, RunTag

        client, run_id = self.client, self.run_id
        if item.kind == "metrics":
            fresh = [m for m in item.payload if (m.key, m.step) not in self.held_metrics]
            if fresh:
                client.log_batch(run_id, metrics=fresh)
            self.delivery.sent_points += len(fresh)
        elif item.kind == "params":
            new = {k: v for k, v in item.payload.items() if k not in self.held_params}
            changed = [f"{k} {self.held_params[k]} -> {v}" for k, v in item.payload.items()
                       if k in self.held_params and self.held_params[k] != v and k != "resume"]  # fmt: skip
            if changed:
                log.info("mlflow: the resumed run keeps its first parameters (MLflow's are immutable); this command "
                         "changed: %s (config.json holds this command's)", ", ".join(changed))  # fmt: skip
            params = [Param(k, v[:6000]) for k, v in new.items()]
            for i in range(0, len(params), BATCH_PARAMS):
                client.log_batch(run_id, params=params[i : i + BATCH_PARAMS])
            self.held_params.update(new)
        elif item.kind == "tags":
            tags = [RunTag(k, str(v)) for k, v in item.payload.items()]
            for i in range(0, len(tags), BATCH_PARAMS):
                client.log_batch(run_id, tags=tags[i : i + BATCH_PARAMS])
        elif item.kind == "artifact":
            client.log_artifact(run_id, str(item.payload))
        elif item.kind == "model":
            self._send_model(item.payload)
        elif item.kind == "end":
            client.set_terminated(run_id, status=item.payload)

    def _send_model(self, checkpoint: Path) -> None:
        """best.pt as an MLflow model of the PyTorch flavour, its class names in the model's metadata."""
        import mlflow.pytorch
        import torch
        import torchvision
        from mlflow.models import infer_signature

        from common.inference import load_trained

        trained = load_trained(str(checkpoint), torch.device("cpu"))
        size = trained.config["image_size"]
        example = torch.zeros(1, 3, size, size)
        with torch.no_grad():
            signature = infer_signature(example.numpy(), trained.model(example).numpy())
        # Created here in the run's experiment: log_model alone would put it in the fluent API's active experiment
        # (Default), since this thread has no active run.
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        logged = self.client.create_logged_model(experiment_id, name="model", source_run_id=self.run_id)
        mlflow.pytorch.log_model(
            trained.model,
            name="model",
            run_id=self.run_id,
            model_id=logged.model_id,
            signature=signature,
            # Given, not inferred: inference imports the model in a subprocess, seconds to minutes.
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
            ],  # fmt: skip
            # Pickled (torch.save of the module): MLflow 3's default, torch.export, fixes the batch size of the
            # example it traces. Loading it needs this package installed (the model classes live here).
            serialization_format="pickle",
            metadata={
                "class_names": trained.classes,
                "arch": trained.config["arch"],
                "image_size": size,
                "val_resize": trained.config["val_resize"],
                "multilabel": trained.multilabel,
            },  # fmt: skip
        )


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"
