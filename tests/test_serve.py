"""`convnets serve`: the KServe v2 protocol with the real tritonclient, image bytes decoded as `evaluate` decodes
them, dynamic batching under concurrency, every bad input answered with a 4xx, metrics, the page in a browser,
and a SIGTERM that answers the requests in flight. One server per module (a tiny resnet18 at 32x32)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, ROOT, make_image
from PIL import Image

httpclient = pytest.importorskip("tritonclient.http", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="needs the serve extra")

CLASSES = sorted(COLORS)
MODEL = "resnet18"


def write_tiny_checkpoint(path: Path) -> Path:
    """A checkpoint as training writes it (the entries load_trained reads), with untrained weights."""
    from common.builders import build_model
    from common.registry import get_model_spec

    torch.manual_seed(0)
    model = build_model(get_model_spec(MODEL), len(CLASSES))
    config = {"arch": MODEL, "num_classes": len(CLASSES), "width_mult": None, "image_size": 32, "val_resize": 36,
              "memory_format": "contiguous", "freeze_backbone": False}  # fmt: skip
    state = {"format": "convnets-checkpoint-v1", "arch": MODEL, "model": model.state_dict(), "config": config,
             "class_names": CLASSES}  # fmt: skip
    torch.save(state, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = checkpoint.with_name(f"serve_{port}.log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "common", "serve", "--checkpoint", str(checkpoint), "--port", str(port), *extra],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    url = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2).status == 200:
                return proc, url, log
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"server not ready after 120 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.pt")


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url, log = start_server(checkpoint, "--max-batch-size", "8", "--max-queue-delay-ms", "20",
                                  "--max-body-mb", "1", "--max-image-pixels", "1000000")  # fmt: skip
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The probabilities `evaluate`/`predict` compute for an image file: load_rgb, eval_transform, Normalizer."""
    from common.data import Normalizer, eval_transform, load_rgb
    from common.inference import load_trained

    trained = load_trained(str(checkpoint), torch.device("cpu"))
    transform, normalize = eval_transform(trained.pipeline), Normalizer(torch.device("cpu"), False)

    def tensor(path) -> np.ndarray:
        return normalize(transform(load_rgb(path))[None])[0].numpy()

    def probs(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return trained.model(torch.from_numpy(batch)).softmax(1).numpy()

    return tensor, probs


def image_bytes(seed: int, fmt: str = "PNG", mode: str = "RGB", size: int = 40) -> bytes:
    color = list(COLORS.values())[seed % len(COLORS)]
    image = Image.fromarray(make_image(np.random.default_rng(seed), color, size)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def post(url: str, body: bytes, path: str = f"/v2/models/{MODEL}/infer", headers=None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{url}{path}", timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_health_and_metadata(server):
    client = httpclient.InferenceServerClient(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready("vgg11")
    meta = client.get_model_metadata(MODEL)
    assert meta["parameters"]["classes"] == CLASSES
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"input": [-1, 3, 32, 32], "image": [-1]}
    assert meta["parameters"]["preprocessing"]["resize"] == 36
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_tensor_round_trip(server, reference, binary):
    _, probs = reference
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    client = httpclient.InferenceServerClient(server)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "top_classes")]
    result = client.infer(MODEL, [inp], outputs=outputs)
    got = result.as_numpy("probabilities")
    np.testing.assert_allclose(got, probs(x), atol=1e-5)
    top = [[c.decode() if isinstance(c, bytes) else c for c in row] for row in result.as_numpy("top_classes")]
    assert top == [[CLASSES[i] for i in np.argsort(-p, kind="stable")] for p in got]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_image_bytes_decoded_as_evaluate_does(server, reference, tmp_path, binary):
    tensor, probs = reference
    files = []
    for i, (fmt, mode) in enumerate([("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P")]):
        path = tmp_path / f"{i}.{fmt.lower()}"
        path.write_bytes(image_bytes(i, fmt, mode, size=40 + 7 * i))
        files.append(path)
    want = probs(np.stack([tensor(str(f)) for f in files]))
    client = httpclient.InferenceServerClient(server)
    inp = httpclient.InferInput("image", [len(files)], "BYTES")
    data = np.array([f.read_bytes() for f in files], dtype=np.object_)
    if binary:
        inp.set_data_from_numpy(data, binary_data=True)
        result = client.infer(MODEL, [inp]).as_numpy("probabilities")
    else:  # JSON carries image files as base64 strings
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(files)],
                            "data": [base64.b64encode(f.read_bytes()).decode() for f in files]}]}  # fmt: skip
        status, answer = post(server, json.dumps(body).encode())
        assert status == 200, answer
        result = np.array(answer["outputs"][0]["data"], np.float32).reshape(len(files), -1)
    np.testing.assert_allclose(result, want, atol=1e-5)


def test_concurrent_requests_each_get_their_own_answer(server, reference):
    """24 clients at once with different images: batched together, each answered with its own result."""
    tensor, probs = reference
    n = 24
    images = [image_bytes(100 + i, size=36 + i) for i in range(n)]
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def client_thread(i: int) -> None:
        try:
            client = httpclient.InferenceServerClient(server)
            inp = httpclient.InferInput("image", [1], "BYTES")
            inp.set_data_from_numpy(np.array([images[i]], dtype=np.object_), binary_data=True)
            barrier.wait()
            results[i] = client.infer(MODEL, [inp]).as_numpy("probabilities")[0]
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    before = _metric(server, "convnets_batch_size_count")
    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    want = probs(np.stack([tensor(io.BytesIO(b)) for b in images]))
    np.testing.assert_allclose(np.stack(results), want, atol=1e-5)
    batches = _metric(server, "convnets_batch_size_count") - before
    assert batches < n, "the dynamic batcher ran every request alone"


@pytest.mark.parametrize("instances", [1, 2])
def test_model_instances_compute_their_batches_at_the_same_time(instances):
    """With ``--instances N`` N batches are inside the model at once (each request still gets its own answer);
    with one, never two. A batch waits in the model until ``instances`` are inside (at most 10 s)."""
    from common.serving.batcher import DynamicBatcher

    inside, most, cond = 0, 0, threading.Condition()

    def run(x: np.ndarray) -> np.ndarray:
        nonlocal inside, most
        with cond:
            inside += 1
            most = max(most, inside)
            cond.notify_all()
            cond.wait_for(lambda: most >= instances, timeout=10)
            inside -= 1
        return x * 2

    async def serve() -> list[np.ndarray]:
        batcher = DynamicBatcher(run, max_batch_size=1, max_delay_s=0.001, instances=instances)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(np.full((1, 3), i, np.float32)) for i in range(6)))
        finally:
            await batcher.stop()

    answers = asyncio.run(serve())
    assert [a.tolist() for a in answers] == [[[2.0 * i] * 3] for i in range(6)]
    assert most == instances


def _metric(url: str, name: str, labels: str = f'model="{MODEL}"') -> float:
    text = get(url, "/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that claims width x height pixels but holds almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _image_request(data: bytes) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 4 + len(data)}}]}).encode()  # fmt: skip
    return head + struct.pack("<I", len(data)) + data, {"Inference-Header-Content-Length": str(len(head))}


def _tensor_request(name="input", datatype="FP32", shape=(1, 3, 32, 32), data=None) -> bytes:
    data = [0.5] * int(np.prod(shape)) if data is None else data
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data}]}).encode()


BAD_REQUESTS = {
    "malformed-json": (lambda: (b'{"inputs": [', {}), 400, "not valid JSON"),
    "wrong-shape": (lambda: (_tensor_request(shape=(1, 3, 16, 16)), {}), 400, "shape [N,3,32,32]"),
    "data-size-mismatch": (lambda: (_tensor_request(data=[1.0] * 5), {}), 400, "5 values"),
    "wrong-datatype": (lambda: (_tensor_request(datatype="INT64"), {}), 400, "datatype FP32"),
    "wrong-input-name": (lambda: (_tensor_request(name="pixels"), {}), 400, "unknown input name 'pixels'"),
    "strings-as-fp32": (lambda: (_tensor_request(data=["a"] * 3072), {}), 400, "must be numbers"),
    "not-an-image": (lambda: _image_request(b"this is not an image at all"), 400, "not an image"),
    "truncated-image": (lambda: _image_request(image_bytes(0)[:80]), 400, "cannot decode"),
    "decompression-bomb": (lambda: _image_request(png_header(3000, 3000)), 400, "3000x3000 pixels"),
    "huge-bomb": (lambda: _image_request(png_header(60000, 60000)), 400, "decompression bomb"),
    "thin-strip": (lambda: _image_request(png_header(1, 100_000)), 400, "once its shorter side is resized to 36"),
    "zero-pixels": (lambda: _image_request(png_header(0, 10)), 400, "image"),
    "binary-size-lies": (
        lambda: (_image_request(image_bytes(0))[0][:-10], _image_request(image_bytes(0))[1]),
        400,
        "binary_data_size",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_4xx_and_server_keeps_serving(server, case):
    make, status, message = BAD_REQUESTS[case]
    body, headers = make()
    before = _metric(server, "convnets_inference_failures_total", f'code="{status}"')
    got, answer = post(server, body, headers=headers)
    assert (got, set(answer)) == (status, {"error"}), answer
    assert message in answer["error"]
    assert _metric(server, "convnets_inference_failures_total", f'code="{status}"') == before + 1
    ok, _ = post(server, _tensor_request())
    assert ok == 200


def test_body_over_limit_refused_before_it_is_read(server):
    """413 from the declared Content-Length alone: the server does not wait for (or buffer) a 2 MB body."""
    host, port = server.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {2 * 1024 * 1024}\r\n\r\n".encode())  # fmt: skip
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply
    assert "--max-body-mb" in json.loads(body)["error"]
    assert post(server, _tensor_request())[0] == 200


def test_unknown_model_and_route(server):
    status, answer = post(server, _tensor_request(), path="/v2/models/vgg11/infer")
    assert status == 404 and "unknown model 'vgg11'" in answer["error"]
    status, body = get(server, "/v2/nothing")
    assert status == 404 and "error" in json.loads(body)


def test_metrics_in_prometheus_format(server):
    post(server, _tensor_request())
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(get(server, "/metrics")[1].decode())}
    for name in ("convnets_inference_requests", "convnets_inference_failures", "convnets_inference_latency_seconds",
                 "convnets_queue_time_seconds", "convnets_batch_size"):  # fmt: skip
        assert name in families, name
    requests = [s for s in families["convnets_inference_requests"].samples if s.name.endswith("_total")]
    assert requests[0].labels == {"model": MODEL} and requests[0].value >= 1
    assert _metric(server, "convnets_inference_latency_seconds_count") >= 1


def _browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium); Playwright is not allowed to download one")
    pytest.importorskip("playwright.sync_api", reason="needs playwright (the serve extra)")
    return exe


def test_page_shows_top5_bars_in_a_browser(server, reference, tmp_path):
    from playwright.sync_api import sync_playwright

    exe = _browser()
    tensor, probs = reference
    path = tmp_path / "picked.jpg"
    path.write_bytes(image_bytes(7, "JPEG", size=48))
    want = probs(tensor(str(path))[None])[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"http://{server}/")
            assert MODEL in page.title()
            page.set_input_files("#file", str(path))
            page.wait_for_selector("#results .row", timeout=30_000)
            rows = page.eval_on_selector_all(".row", "rs => rs.map(r => [r.dataset.class, +r.dataset.prob])")
            widths = page.eval_on_selector_all(".bar", "bs => bs.map(b => b.style.width)")
            bad = page.locator("#error").text_content()
        finally:
            browser.close()
    assert bad == ""
    order = np.argsort(-want, kind="stable")
    assert [r[0] for r in rows] == [CLASSES[i] for i in order]  # 4 classes: the top-5 holds all of them
    np.testing.assert_allclose([r[1] for r in rows], want[order], atol=1e-5)
    assert widths[0] == f"{100 * want[order[0]]:.1f}%"


def test_sigterm_answers_requests_in_flight(checkpoint, reference):
    """Requests waiting in the batcher's queue when SIGTERM arrives are answered; the process exits 0."""
    _, probs = reference
    proc, url, log = start_server(checkpoint, "--max-batch-size", "64", "--max-queue-delay-ms", "4000")
    x = np.random.default_rng(3).standard_normal((6, 3, 32, 32)).astype(np.float32)
    results = [None] * len(x)

    def send(i: int) -> None:
        status, answer = post(url, _tensor_request(shape=(1, 3, 32, 32), data=x[i].ravel().tolist()))
        results[i] = (status, answer)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(x))]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while _metric(url, "convnets_inference_requests_total") < len(x) and time.time() < deadline:
        time.sleep(0.05)
    # All six received, none run yet: the batch closes 4 s after the first one arrived.
    assert _metric(url, "convnets_batch_size_count") == 0
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    code = proc.wait(30)
    assert code == 0, log.read_text()
    assert all(r is not None and r[0] == 200 for r in results), results
    got = np.array([r[1]["outputs"][0]["data"] for r in results], np.float32)
    np.testing.assert_allclose(got, probs(x), atol=1e-5)
    assert "server stopped: 6 inference requests received, 6 answered (0 with an error)" in log.read_text()
