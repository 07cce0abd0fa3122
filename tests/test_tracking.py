"""TensorBoard and MLflow sinks with the real parts: a real ``mlflow server`` on 127.0.0.1 (SQLite store, local
artifact folder, a free port, stopped by its process group even when a test fails), runs read back with
``MlflowClient`` and tensorboard's own ``EventAccumulator`` and compared value by value with ``log.json``; a run
killed with SIGKILL and resumed; torchrun with 2 processes; the server killed mid-run; ``--target-top1``.

The server takes tens of seconds to start on a small machine: it is started when this module starts, and the tests
that need no server run first, while it boots. The last test kills it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.checkpoint import load_checkpoint
from common.logger import read_log
from tests.conftest import FAST_TRAIN, ONE_THREAD, ROOT, make_tree, run_cli

# MLflow's usage telemetry would try to reach its own hosts: nothing but the test's server is contacted.
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
os.environ.update(QUIET)


@dataclass
class Server:
    uri: str
    store: str  # the server's own SQLite store, read directly once the server is gone
    proc: subprocess.Popen
    log: Path

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"mlflow server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """The whole process group: ``mlflow server`` runs uvicorn workers below it."""
        if self.proc.poll() is None or _group_alive(self.proc.pid):
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                except subprocess.TimeoutExpired:
                    continue
                if not _group_alive(self.proc.pid):
                    break
        self.proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """``mlflow server`` started (not yet waited for) at the module's start; stopped by PID at its end."""
    pytest.importorskip("mlflow", reason="mlflow (pip install -e '.[tracking]')")
    folder = tmp_path_factory.mktemp("mlflow")
    port, log = free_port(), folder / "server.log"
    store = f"sqlite:///{folder}/mlflow.db"
    # No job runner: it starts a queue of worker processes that these tests do not use.
    env = {**os.environ, **QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
             str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True,
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", store, proc, log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True, scope="module")
def _boot_early(request):
    """Start the server as the module starts, when mlflow is there: the first tests run while it boots."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return
    request.getfixturevalue("server_process")


@pytest.fixture
def mlflow_server(server_process) -> Server:
    server_process.wait_ready()
    return server_process


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """96 train and 32 val images: 6 batches of 16 an epoch."""
    return make_tree(tmp_path_factory.mktemp("tracking"), train_per_class=24, val_per_class=8)


BATCHES = 6  # training batches per epoch of one process on ``tree``


def train_args(tree: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["train", "--data", str(tree), "--data-backend", "pytorch", "--epochs", str(epochs), "--deterministic",
            "--output", str(out), *FAST_TRAIN, "--workers", "0", *extra]  # fmt: skip


def expected_points(log_json: Path, batches: int = BATCHES) -> dict[tuple[str, int], list[float]]:
    """Every (sink key, global step) that ``log.json`` implies, with the values it holds for it in order (a resumed
    run's log holds the killed attempt's lines and the replay's). Written out here, not taken from the sinks' code."""
    points: dict[tuple[str, int], list[float]] = {}
    last = 0
    for record in read_log(log_json):
        step = record["step"]
        if not isinstance(step, list):
            continue
        if len(step) == 2:
            prefix, at = "step", step[0] * batches + step[1]
        elif len(step) == 1:
            prefix, at = "epoch", (step[0] + 1) * batches
        else:
            prefix, at = "final", last
        last = max(last, at)
        for key, value in record["data"].items():
            points.setdefault((f"{prefix}/{key}", at), []).append(float(value))
    return points


def mlflow_points(client, run_id: str) -> dict[tuple[str, int], list[float]]:
    run = client.get_run(run_id)
    points: dict[tuple[str, int], list[float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            points.setdefault((key, m.step), []).append(m.value)
    return points


def tensorboard_points(folder: Path) -> dict[tuple[str, int], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    points: dict[tuple[str, int], list[float]] = {}
    for tag in events.Tags()["scalars"]:
        for e in events.Scalars(tag):
            points.setdefault((tag, e.step), []).append(e.value)
    return points


def float32(value: float) -> float:
    import numpy as np

    return float(np.float32(value))


def assert_one_value_per_step_from_the_log(found: dict, expected: dict, stored=float) -> None:
    """Each step once, every step of the log there, and its value one the log holds for it (as the sink stores
    numbers: float64 in MLflow, float32 in TensorBoard)."""
    duplicated = {k: v for k, v in found.items() if len(v) > 1}
    assert not duplicated, f"duplicated steps: {sorted(duplicated)[:5]}"
    assert set(found) == set(expected), (sorted(set(expected) - set(found))[:5], sorted(set(found) - set(expected))[:5])
    for key, (value,) in found.items():
        assert value in [stored(v) for v in expected[key]], (key, value, expected[key])


def run_id_of(experiment: str, client) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


# ----------------------------------------------------------------------------------------------------------
# No server needed: these run while it boots


def test_options_and_presets_choose_the_sinks(tmp_path, monkeypatch):
    from common import cli, config
    from common.errors import UserError
    from common.tracking import resolve_mlflow_uri, resolve_tensorboard_dir

    args = cli.build_parser().parse_args(["train", "--tensorboard", "--mlflow", "--experiment", "e", "--run-name", "r"])
    cfg = config.resolve(config.TrainConfig, cli._cli_values(args, config.TrainConfig))
    assert (cfg.tensorboard, cfg.mlflow, cfg.experiment, cfg.run_name) == ("auto", "auto", "e", "r")
    assert resolve_tensorboard_dir(cfg.tensorboard, Path("runs/x")) == Path("runs/x/tensorboard")
    preset = tmp_path / "p.toml"
    preset.write_text('tensorboard = true\nmlflow = "http://mlflow.internal:5000"\ntarget_top1 = 75.9\n')
    cfg = config.resolve(config.TrainConfig, {}, str(preset))
    assert (cfg.tensorboard, cfg.mlflow, cfg.target_top1) == ("auto", "http://mlflow.internal:5000", 75.9)
    cfg = config.resolve(config.TrainConfig, {"tensorboard": None}, str(preset))  # --no-tensorboard
    assert cfg.tensorboard is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"):
        resolve_mlflow_uri("auto")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_mlflow_uri("auto") == "http://mlflow.internal:5000"
    with pytest.raises(UserError, match="percentage"):
        config.resolve(config.TrainConfig, {"target_top1": 150.0})


def test_a_wrong_uri_is_a_clear_message_and_a_dead_server_costs_the_training_nothing(caplog, monkeypatch):
    """A URI MLflow cannot use stops the command at start-up; a server that is not there (a free port on
    127.0.0.1: refused at once) only costs one warning: logging returns at once, and the end says in one line
    what was dropped."""
    pytest.importorskip("mlflow", reason="mlflow (pip install -e '.[tracking]')")
    from common.errors import UserError
    from common.tracking.mlflow_sink import MlflowSink, check_uri

    for uri, message in (("localhost:5000", "not a URI"), ("htp://host:5000", "cannot use this tracking URI"),
                         ("http://", "names no host")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            check_uri(uri)
    # The training thread never waits for the server: every call of MLflow's client comes from the sink's thread.
    from mlflow.tracking import MlflowClient

    callers = []
    for name in ("get_experiment_by_name", "create_experiment", "create_run", "log_batch", "get_run"):
        original = getattr(MlflowClient, name)

        def traced(self, *args, _original=original, **kwargs):
            callers.append(threading.current_thread().name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, traced)
    sink = MlflowSink(f"http://127.0.0.1:{free_port()}", "e", "r", None, timeout_s=1.0, log_model=False)
    for step in range(1, 201):
        sink.scalars({"step/train.loss": 1.0 / step, "step/train.lr": 0.1}, step)
    assert sink.queued_points == 400  # all kept, none sent: the server is not there
    sink.close("FINISHED")
    assert callers and set(callers) == {"mlflow-sink"}, callers
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("cannot reach" in w for w in warnings) == 1, warnings
    (dropped,) = [w for w in warnings if "not delivered" in w]
    assert "400 metric point(s)" in dropped and "0 point(s) reached" in dropped


def test_target_top1_stops_at_the_first_epoch_that_reaches_it_and_every_sink_gets_it(tree, tmp_path):
    """A small real run with a target its third epoch or so reaches: it stops right after the first evaluation at
    or above it, logs the epoch and seconds to it in log.json and TensorBoard; a restart does not train on."""
    pytest.importorskip("tensorboard", reason="tensorboard (pip install -e '.[tracking]')")
    out, target = tmp_path / "run", 60.0
    run_cli(*train_args(tree, out, "--target-top1", str(target), "--tensorboard", epochs=6))
    records = read_log(out / "log.json")
    epochs = [r for r in records if isinstance(r["step"], list) and len(r["step"]) == 1]
    top1 = [r["data"]["val.top1"] for r in epochs]
    first = next(i for i, t in enumerate(top1) if t >= target)
    assert first < 5, f"the target was not reached before the last epoch: {top1}"
    assert len(epochs) == first + 1, f"trained past the first epoch at {target}%: {top1}"
    assert epochs[-1]["data"]["target.epoch"] == first and epochs[-1]["data"]["target.seconds"] > 0
    assert all("target.epoch" not in r["data"] for r in epochs[:-1])
    final = records[-1]["data"]
    assert final["target.epoch"] == first and final["target.top1"] == target
    assert not (out / f"checkpoint_epoch_{first + 1:04d}.pt").exists()
    assert load_checkpoint(out / f"checkpoint_epoch_{first:04d}.pt")["target"]["epoch"] == first
    board = tensorboard_points(out / "tensorboard")
    assert board[("epoch/target.epoch", (first + 1) * BATCHES)] == [first]
    assert board[("final/target.seconds", (first + 1) * BATCHES)] == [float32(final["target.seconds"])]

    again = run_cli(*train_args(tree, out, "--target-top1", str(target), "--resume", "auto", epochs=6))
    assert "reached the target top1 60% at epoch" in again.stdout and "nothing to train" in again.stdout
    assert not (out / f"checkpoint_epoch_{first + 1:04d}.pt").exists()


# ----------------------------------------------------------------------------------------------------------
# With the server


def test_a_run_reaches_mlflow_and_tensorboard_with_the_values_of_log_json(mlflow_server, tree, tmp_path):
    """Params, every metric's history, tags, artifacts (the best checkpoint as a PyTorch model with its class
    names, which the registry takes) on the server; the same scalars in the TensorBoard event file."""
    import mlflow
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    proc = run_cli(*train_args(tree, out, "--mlflow", mlflow_server.uri, "--experiment", "readback", "--run-name",
                               "colors", "--tensorboard", "--mlflow-model", "--positive-class", "red",
                               "--print-freq", "2"), env=QUIET)  # fmt: skip
    client = MlflowClient(mlflow_server.uri)
    (run,) = run_id_of("readback", client)
    assert run.info.status == "FINISHED" and run.info.run_name == "colors"
    assert f"mlflow: run {run.info.run_id}" in proc.stdout

    from common.tracking import flat_params

    config = __import__("json").loads((out / "config.json").read_text())
    assert run.data.params == flat_params(config)
    expected = expected_points(out / "log.json")
    assert any(k.startswith("epoch/val.roc_auc") for k, _ in expected)  # the positive class's metrics are there
    assert_one_value_per_step_from_the_log(mlflow_points(client, run.info.run_id), expected)
    tags = run.data.tags
    assert {k: tags[k] for k in ("arch", "recipe", "train_images", "device", "world_size")} == {
        "arch": "resnet18", "recipe": "resnet50", "train_images": "96", "device": "cpu", "world_size": "1"}  # fmt: skip
    assert tags["data"] == str(tree.resolve())
    if (ROOT / ".git").exists():
        assert (
            re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]) and tags["mlflow.source.git.commit"] == tags["git_commit"]
        )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "log.json", "confusion_matrix.png"} <= artifacts and "best.pt" not in artifacts
    local = Path(client.download_artifacts(run.info.run_id, "log.json", str(tmp_path)))
    assert local.read_bytes() == (out / "log.json").read_bytes()

    mlflow.set_tracking_uri(mlflow_server.uri)  # the fluent API below: an earlier test may have pointed it elsewhere
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.source_run_id == run.info.run_id
    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    assert info.metadata["class_names"] == ["blue", "green", "red", "yellow"]
    version = mlflow.register_model(f"models:/{model.model_id}", "convnets-colors")
    assert version.version == "1"

    board = out / "tensorboard"
    assert len(list(board.glob("events.out.tfevents.*"))) == 1
    assert_one_value_per_step_from_the_log(tensorboard_points(board), expected, stored=float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board), size_guidance={"images": 0})
    events.Reload()
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    assert events.Tags()["images"] == ["val/confusion_matrix"]


def test_a_killed_run_resumes_into_the_same_mlflow_run_without_duplicated_steps(mlflow_server, tree, tmp_path):
    """SIGKILL once the server holds steps past the first checkpoint, then ``--resume auto``: the same MLflow run
    (its id came from the checkpoint), each step once in MLflow and in TensorBoard, none missing."""
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "run", mlflow_server.uri
    args = train_args(tree, out, "--mlflow", uri, "--experiment", "resume", "--tensorboard", "--print-freq", "1",
                      epochs=2)  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, **QUIET}
    client = MlflowClient(uri)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "common", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline, run_id, held = time.time() + 300, None, []
        while time.time() < deadline and proc.poll() is None:
            found = re.search(r"mlflow: run (\w+)", (tmp_path / "killed.log").read_text())
            run_id = found.group(1) if found else None
            held = [m.step for m in client.get_metric_history(run_id, "step/train.loss")] if run_id else []
            if any(s > BATCHES + 1 for s in held):  # the server holds steps of the epoch after the checkpoint
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (out / "checkpoint_epoch_0000.pt").exists() and not (out / "checkpoint_epoch_0001.pt").exists()
    assert load_checkpoint(out / "checkpoint_epoch_0000.pt")["tracking"]["mlflow_run_id"] == run_id

    resumed = run_cli(*args, "--resume", "auto", env=QUIET)
    assert f"continuing run {run_id}" in resumed.stdout
    (run,) = run_id_of("resume", client)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    expected = expected_points(out / "log.json")
    assert any(len(v) > 1 for v in expected.values())  # the log holds the killed attempt's steps and the replay's
    assert_one_value_per_step_from_the_log(mlflow_points(client, run_id), expected)
    assert_one_value_per_step_from_the_log(tensorboard_points(out / "tensorboard"), expected, stored=float32)


def test_two_processes_write_one_mlflow_run_and_one_event_file(mlflow_server, tree, tmp_path):
    """torchrun with 2 processes (gloo on the CPU): rank 0 alone writes, the run holds what log.json holds."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(ROOT / "common" / "launch.sh"), "2",
         *train_args(tree, out, "--mlflow", mlflow_server.uri, "--experiment", "ddp", "--tensorboard", epochs=1)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, **QUIET, "PYTHON": sys.executable},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = MlflowClient(mlflow_server.uri)
    (run,) = run_id_of("ddp", client)
    assert run.data.tags["world_size"] == "2"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    expected = expected_points(out / "log.json", batches=BATCHES // 2)  # each rank trains on half of the batches
    assert_one_value_per_step_from_the_log(mlflow_points(client, run.info.run_id), expected)


def test_the_server_killed_mid_run_costs_a_warning_and_training_finishes(mlflow_server, tree, tmp_path):
    """The server's process group gets SIGKILL once it holds the run's first points: training goes on and ends,
    saying in one line how many points did not reach the server; the server's own store (read directly) holds
    the others. Kills this module's server: the last test here."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    args = train_args(tree, out, "--mlflow", mlflow_server.uri, "--experiment", "outage", "--print-freq", "1",
                      "--mlflow-timeout", "2")  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, **QUIET}
    client = MlflowClient(mlflow_server.uri)
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "common", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline, run_id = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None:
            found = re.search(r"mlflow: run (\w+)", (tmp_path / "train.log").read_text())
            run_id = found.group(1) if found else None
            # Into the second epoch: the server holds the first one's points when it dies.
            if run_id and any(m.step > BATCHES for m in client.get_metric_history(run_id, "step/train.loss")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the server could be killed"
        os.killpg(mlflow_server.proc.pid, signal.SIGKILL)
        mlflow_server.stop()
        assert proc.wait(300) == 0, (tmp_path / "train.log").read_text()
    finally:
        proc.kill()
    text = (tmp_path / "train.log").read_text()
    assert text.count("mlflow: cannot reach") == 1, text
    (line,) = [line for line in text.splitlines() if "not delivered" in line]
    dropped, reached = map(int, re.search(r"(\d+) metric point\(s\).* (\d+) point\(s\) reached", line).groups())
    stored = mlflow_points(MlflowClient(mlflow_server.store), run_id)
    total = sum(len(v) for v in expected_points(out / "log.json").values())
    print(f"\nserver killed mid-run: {len(stored)} of {total} points on the server, {dropped} dropped: {line}")
    assert dropped > 0 and len(stored) == reached
    # Exact unless the server took a batch and died before answering, which the sender then counts as dropped.
    assert total <= reached + dropped <= total + 1000
    assert read_log(out / "log.json")[-1]["step"] == []  # the run's summary: training ended normally
