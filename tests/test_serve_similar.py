"""``convnets serve --index``: the server answers "similar to this image" from an index written by ``convnets
embed``, with the same network and preprocessing; an index of another network refuses to start; no index is a 404
that says how to get one; a bad ``k`` is a 400 naming it. In process, with fastapi's TestClient (one tiny resnet18
at 32x32 and an index of eight images per module)."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from common import config
from common.errors import UserError
from tests.test_organize import write_tiny_checkpoint

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("faiss", reason="needs the owndata extra: pip install -e '.[owndata]'")
pytest.importorskip("httpx2", reason="fastapi's TestClient needs httpx2 (the serve extra)")
from fastapi.testclient import TestClient  # noqa: E402 - after the skips

from common.owndata.embed import run_embed  # noqa: E402
from common.serving.app import create_app  # noqa: E402
from common.serving.config import ServeConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODEL = "resnet18"
COUNT = 8


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A tiny checkpoint and the index `convnets embed` writes of eight distinct images (and the images' paths)."""
    root = tmp_path_factory.mktemp("similar")
    rng = np.random.default_rng(5)
    for i in range(COUNT):
        (root / "photos").mkdir(exist_ok=True)
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40 + 3 * i, 48), Image.BICUBIC).save(root / "photos" / f"{i}.png")
    checkpoint = write_tiny_checkpoint(root / "tiny.pt")
    cfg = config.resolve(config.EmbedConfig, {"checkpoint": str(checkpoint), "paths": [str(root / "photos")],
                                              "out": str(root / "index"), "device": "cpu", "workers": 0})  # fmt: skip
    assert run_embed(cfg) == 0
    return checkpoint, root / "index"


def serve_config(checkpoint, index=None) -> ServeConfig:
    return ServeConfig(checkpoint=str(checkpoint), index=index and str(index), device="cpu", workers=2,
                       max_batch_size=8, max_queue_delay_ms=30).check()  # fmt: skip


@pytest.fixture(scope="module")
def client(indexed):
    checkpoint, index = indexed
    with TestClient(create_app(serve_config(checkpoint, index))) as c:  # runs the lifespan: batchers started
        yield c


def binary_request(*files) -> tuple[bytes, dict]:
    """The infer body: a JSON header, then the files as Triton BYTES elements (4-byte length + bytes)."""
    data = b"".join(struct.pack("<I", len(f)) + f for f in files)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(files)],
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()  # fmt: skip
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


def metric(client, name: str, labels: str = f'model="{MODEL}"') -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_indexed_image_comes_back_first_then_the_exact_ranking(client, indexed):
    _, index = indexed
    paths = (index / "paths.txt").read_text().splitlines()
    vectors = np.load(index / "embeddings.npy")
    before = metric(client, "convnets_similar_requests_total")
    body, headers = binary_request(open(paths[2], "rb").read(), open(paths[5], "rb").read())
    response = client.post(f"/v2/models/{MODEL}/similar?k=4", content=body, headers=headers)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == MODEL and answer["k"] == 4 and len(answer["results"]) == 2
    for query, hits in zip((2, 5), answer["results"], strict=True):
        assert len(hits) == 4
        assert hits[0]["path"] == paths[query] and hits[0]["distance"] == pytest.approx(0, abs=1e-4)
        # The rest ranked as exact cosine search over the embeddings `embed` stored.
        want = np.argsort(-(vectors @ vectors[query]), kind="stable")[:4]
        assert [h["path"] for h in hits] == [paths[i] for i in want]
        np.testing.assert_allclose([h["score"] for h in hits], (vectors @ vectors[query])[want], atol=1e-4)
        assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    # JSON with base64, as infer accepts it; no k: the default 10 capped at the index size.
    body = {"id": "q1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                    "data": [base64.b64encode(open(paths[7], "rb").read()).decode()]}]}  # fmt: skip
    answer = client.post(f"/v2/models/{MODEL}/similar", json=body).json()
    assert answer["id"] == "q1" and answer["k"] == COUNT and answer["results"][0][0]["path"] == paths[7]
    assert metric(client, "convnets_similar_requests_total") == before + 2
    assert metric(client, "convnets_similar_latency_seconds_count") >= 2


def test_metadata_says_search_is_on(client, indexed):
    similar = client.get(f"/v2/models/{MODEL}").json()["parameters"]["similar"]
    assert similar == {"enabled": True, "route": f"/v2/models/{MODEL}/similar?k=K", "index": str(indexed[1]),
                       "count": COUNT, "dim": 512, "index_type": "flat"}  # fmt: skip
    assert 'data-similar="true"' in client.get("/").text


def test_concurrent_queries_share_an_embedding_batch(client, indexed):
    paths = (indexed[1] / "paths.txt").read_text().splitlines()
    n = 6
    barrier, answers = threading.Barrier(n), [None] * n

    def query(i: int) -> None:
        body, headers = binary_request(open(paths[i], "rb").read())
        barrier.wait()
        answers[i] = client.post(f"/v2/models/{MODEL}/similar?k=1", content=body, headers=headers).json()

    before = metric(client, "convnets_similar_batch_size_count")
    threads = [threading.Thread(target=query, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a["results"][0][0]["path"] for a in answers] == paths[:n]  # each answered with its own image
    assert metric(client, "convnets_similar_batch_size_count") - before < n, "every query ran alone"


@pytest.mark.parametrize("k", ["0", "-3", "ten", "2.5", str(COUNT + 1)])
def test_bad_k_is_a_400_naming_k(client, indexed, k):
    paths = (indexed[1] / "paths.txt").read_text().splitlines()
    before = metric(client, "convnets_similar_failures_total", 'code="400"')
    body, headers = binary_request(open(paths[0], "rb").read())
    response = client.post(f"/v2/models/{MODEL}/similar?k={k}", content=body, headers=headers)
    assert response.status_code == 400 and "'k'" in response.json()["error"], response.text
    assert metric(client, "convnets_similar_failures_total", 'code="400"') == before + 1


def test_a_bad_image_is_a_400_and_an_unknown_model_a_404(client):
    body, headers = binary_request(b"not an image")
    response = client.post(f"/v2/models/{MODEL}/similar", content=body, headers=headers)
    assert response.status_code == 400 and "not an image" in response.json()["error"]
    response = client.post("/v2/models/vgg11/similar", content=body, headers=headers)
    assert response.status_code == 404 and "unknown model 'vgg11'" in response.json()["error"]


def test_without_index_the_route_is_a_404_saying_how(indexed):
    checkpoint, _ = indexed
    with TestClient(create_app(serve_config(checkpoint))) as c:
        response = c.post(f"/v2/models/{MODEL}/similar?k=3", content=b"{}")
        assert response.status_code == 404 and "--index" in response.json()["error"], response.text
        assert c.get(f"/v2/models/{MODEL}").json()["parameters"]["similar"] == {"enabled": False}
        assert 'data-similar="false"' in c.get("/").text


def _retrained(checkpoint, out):
    state = torch.load(checkpoint, weights_only=False)
    state["model"]["fc.bias"] = state["model"]["fc.bias"] + 1
    torch.save(state, out)
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch": "mobilenet_v2"}, "it holds mobilenet_v2 embeddings, the server serves resnet18"),
        ({"image_size": 64}, "built at image size 64, the server's checkpoint evaluates at 32"),
        ("another checkpoint", "sha256"),
        ("no such folder", "not an embedding index"),
    ],
    ids=["arch", "image-size", "checkpoint", "not-an-index"],
)
def test_an_index_of_another_network_refuses_to_start(indexed, tmp_path, change, message):
    checkpoint, index = indexed
    copy = tmp_path / "index"
    if change != "no such folder":
        shutil.copytree(index, copy)
    if isinstance(change, dict):
        meta = json.loads((copy / "meta.json").read_text())
        (copy / "meta.json").write_text(json.dumps(meta | change))
    if change == "another checkpoint":
        checkpoint = _retrained(checkpoint, tmp_path / "retrained.pt")
    with pytest.raises(UserError) as refused:
        create_app(serve_config(checkpoint, copy))
    assert str(copy) in str(refused.value) and message in str(refused.value)


def test_index_needs_a_checkpoint_not_an_export():
    with pytest.raises(UserError, match="--index needs --checkpoint"):
        ServeConfig(model_dir="exports/r18", index="INDEX").check()


def test_serve_parses_index():
    from common.cli import build_parser

    args = build_parser().parse_args(["serve", "--checkpoint", "best.pt", "--index", "INDEX"])
    assert args.index == "INDEX"


def test_page_lists_the_nearest_file_names_in_a_browser(indexed):
    """The page with an index: after an upload, the 5 nearest indexed files, the image itself first."""
    import socket

    import uvicorn

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium); Playwright is not allowed to download one")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the serve extra)")
    checkpoint, index = indexed
    paths = (index / "paths.txt").read_text().splitlines()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(serve_config(checkpoint, index)), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                page.set_input_files("#file", paths[3])
                page.wait_for_selector("#similar li", timeout=30_000)
                listed = page.eval_on_selector_all("#similar li", "items => items.map(i => i.dataset.path)")
                first = page.locator("#similar li").first.text_content()
                error = page.locator("#error").text_content()
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(30)
    assert error == "" and len(listed) == 5 and listed[0] == paths[3]
    assert first.startswith("3.png") and "1.000" in first
