"""``convnets embed`` and ``convnets similar``: the head's input as the embedding, a faiss index beside the
file paths, and the nearest images to a query."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from PIL import Image

from common import config
from common.cli import build_parser
from common.errors import UserError
from common.owndata.embed import build_index, run_embed, run_similar
from tests.conftest import ROOT
from tests.test_organize import write_tiny_checkpoint

pytest.importorskip("faiss", reason="needs the owndata extra: pip install -e '.[owndata]'")


# One intra-op thread, set before the module's index is built (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(1)
    for i in range(40):
        (root / "photos" / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((48, 48), Image.BICUBIC).save(root / "photos" / f"set{i % 2}" / f"{i:02d}.png")
    (root / "photos" / "set0" / "bad.png").write_bytes(b"not a png")
    checkpoint = write_tiny_checkpoint(root / "tiny.pt")
    cfg = config.resolve(config.EmbedConfig, {"checkpoint": str(checkpoint), "paths": [str(root / "photos")],
                                              "out": str(root / "index"), "device": "cpu", "workers": 0,
                                              "batch_size": 16})  # fmt: skip
    assert run_embed(cfg) == 1  # the bad file
    return root, checkpoint


def test_the_index_holds_the_penultimate_layer_of_every_readable_image(index):
    root, checkpoint = index
    meta = json.loads((root / "index" / "meta.json").read_text())
    paths = (root / "index" / "paths.txt").read_text().splitlines()
    vectors = np.load(root / "index" / "embeddings.npy")
    assert meta["count"] == len(paths) == 40 and meta["index"] == "flat" and meta["arch"] == "resnet18"
    assert list(meta["bad"]) == [str(root / "photos" / "set0" / "bad.png")]
    assert vectors.shape == (40, 512) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # The same vector as the input the classifier head receives, taken with a hook on the full model.
    from common.data import Normalizer, eval_transform, load_rgb
    from common.inference import load_trained

    trained = load_trained(str(checkpoint), torch.device("cpu"))
    seen = []
    trained.model.fc.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0]))
    image = eval_transform(trained.pipeline)(load_rgb(paths[7]))[None]
    with torch.no_grad():
        trained.model(Normalizer(torch.device("cpu"), False)(image))
    expected = torch.nn.functional.normalize(seen[0], dim=1)[0].numpy()
    assert np.allclose(vectors[7], expected, atol=1e-4)


def test_an_existing_index_is_replaced_only_with_overwrite(index, tmp_path):
    root, checkpoint = index
    out = tmp_path / "index"
    values = {"checkpoint": str(checkpoint), "out": str(out), "device": "cpu", "workers": 0, "batch_size": 16}
    assert run_embed(config.resolve(config.EmbedConfig, {**values, "paths": [str(root / "photos" / "set1")]})) == 0
    before = (out / "paths.txt").read_text()
    with pytest.raises(UserError, match=f"--out {out} holds an index already; .* --overwrite"):
        run_embed(config.resolve(config.EmbedConfig, {**values, "paths": [str(root / "photos")]}))
    assert (out / "paths.txt").read_text() == before
    run_embed(config.resolve(config.EmbedConfig, {**values, "paths": [str(root / "photos")], "overwrite": True}))
    assert (out / "paths.txt").read_text() == (root / "index" / "paths.txt").read_text()


def test_similar_finds_the_image_itself_first(index, capsys):
    root, _ = index
    paths = (root / "index" / "paths.txt").read_text().splitlines()
    args = build_parser().parse_args(["similar", "--index", str(root / "index"), paths[3], paths[30], "-k", "5",
                                      "--device", "cpu"])  # fmt: skip
    typed = {k: v for k, v in vars(args).items() if k in config.SimilarConfig.__dataclass_fields__}
    assert run_similar(config.resolve(config.SimilarConfig, typed)) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in results] == [paths[3], paths[30]]
    for r in results:
        assert len(r["similar"]) == 5 and r["similar"][0]["path"] == r["query"]
        assert r["similar"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        scores = [h["score"] for h in r["similar"]]
        assert scores == sorted(scores, reverse=True)


def test_hnsw_agrees_with_exact_search_on_clustered_vectors():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 64)).astype(np.float32)
    vectors = centres[rng.integers(0, 50, 3000)] + 0.3 * rng.standard_normal((3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact, _ = build_index(vectors, "flat")
    hnsw, kind = build_index(vectors, "hnsw")
    assert kind == "hnsw" and type(hnsw).__name__ == "IndexHNSWFlat"
    _, truth = exact.search(vectors[:200], 10)
    _, found = hnsw.search(vectors[:200], 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall > 0.95


def test_two_ranks_under_torchrun_build_the_same_index(index, tmp_path):
    root, checkpoint = index
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "common",
         "embed", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "index"), str(root / "photos"),
         "--device", "cpu", "--workers", "0", "--batch-size", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert (tmp_path / "index" / "meta.json").is_file(), proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "embeddings.npy", "index.faiss", "meta.json", "paths.txt"]  # fmt: skip
    assert (tmp_path / "index" / "paths.txt").read_text() == (root / "index" / "paths.txt").read_text()
    joined, single = (np.load(folder / "index" / "embeddings.npy") for folder in (tmp_path, root))
    np.testing.assert_allclose(joined, single, atol=1e-5)
    assert json.loads((tmp_path / "index" / "meta.json").read_text())["bad"] == {str(root / "photos/set0/bad.png"): ANY}
