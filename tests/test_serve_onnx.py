"""`convnets serve --runtime onnxruntime --model-dir DIR` without torch (what the slim serving image runs): the
server starts and answers from an ONNX export where `import torch` fails, with ONNX Runtime's own answer for the
same pixels; PIL's resize against torchvision's, which `evaluate` uses."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ONE_THREAD, ROOT, make_image, run_cli
from PIL import Image
from test_serve import CLASSES, MODEL, free_port, image_bytes, write_tiny_checkpoint

httpclient = pytest.importorskip("tritonclient.http", reason="needs the serve extra: pip install -e '.[serve]'")
ort = pytest.importorskip("onnxruntime", reason="needs the serve extra: pip install -e '.[serve]'")

BLOCKER = """import os
open(os.environ["TORCH_IMPORTED_MARK"], "a").write("import torch was attempted\\n")
raise ImportError("torch is made unimportable for this test")
"""


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("serve_onnx")
    checkpoint = write_tiny_checkpoint(folder / "tiny.pt")
    run_cli("export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(folder / "model"))
    return checkpoint, folder / "model"


def test_pil_resize_matches_torchvision_sizes_and_nearly_its_pixels():
    from torchvision.transforms.v2 import functional as F

    from common.data import PipelineSpec, eval_transform
    from common.images import resize_center_crop

    rng, differing, total = np.random.default_rng(0), 0, 0
    # (height, width) of the image, (resize, crop) of the model: square, thin, large, smaller than the crop.
    for (height, width), (resize, crop) in [((40, 40), (36, 32)), ((37, 91), (36, 32)), ((500, 333), (256, 224)),
                                            ((28, 28), (36, 32)), ((64, 30), (30, 32))]:  # fmt: skip
        square = Image.fromarray(make_image(rng, (200, 40, 90), max(height, width)))
        image = square.resize((width, height))
        want = eval_transform(PipelineSpec(image_size=crop, resize_size=resize))(F.pil_to_tensor(image)).numpy()
        got = resize_center_crop(image, resize, crop).transpose(2, 0, 1)
        assert got.shape == want.shape == (3, crop, crop)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 2
        differing, total = differing + int((diff > 0).sum()), total + diff.size
    assert differing / total < 0.01


def test_onnx_serving_runs_without_torch(export, tmp_path):
    checkpoint, model_dir = export
    blocker = tmp_path / "no-torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text(BLOCKER)
    mark, log = tmp_path / "torch-imported.txt", tmp_path / "serve.log"
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", "TORCH_IMPORTED_MARK": str(mark),
           "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "common", "serve", "--runtime", "onnxruntime", "--model-dir", str(model_dir),
         "--port", str(port), "--model-name", MODEL],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
            assert time.time() < deadline, f"server not ready after 90 s:\n{log.read_text()}"
            try:
                if urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        images = [image_bytes(i, size=40 + 9 * i) for i in range(4)]
        client = httpclient.InferenceServerClient(url)
        inp = httpclient.InferInput("image", [len(images)], "BYTES")
        inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
        got = client.infer(MODEL, [inp]).as_numpy("probabilities")
    finally:
        proc.terminate()
        proc.wait(30)
    assert not mark.exists(), mark.read_text()
    assert proc.returncode == 0, log.read_text()

    # ONNX Runtime run here on the same preprocessing (PIL resize), and the checkpoint through torch (torchvision's).
    from common.images import open_rgb, resize_center_crop
    from common.serving.metadata import ModelMetadata
    from common.serving.model import ImageDecoder, load_runtime

    meta = ModelMetadata.read(model_dir)
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1) * np.float32(255) for v in (meta.mean, meta.std))
    pixels = [resize_center_crop(open_rgb(io.BytesIO(b)), meta.resize_size, meta.image_size) for b in images]
    batch = np.stack([(p.transpose(2, 0, 1).astype(np.float32) - mean) / std for p in pixels])
    session = ort.InferenceSession(str(model_dir / meta.model_file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(None, {meta.input_name: batch})[0], atol=1e-6)
    assert meta.classes == CLASSES

    torch_runtime = load_runtime(str(checkpoint), None, "torch", "cpu")
    decode = ImageDecoder(torch_runtime.meta, 40_000_000, torch_resize=True)
    want = torch_runtime(np.stack([decode(b) for b in images]))
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert (got.argmax(1) == want.argmax(1)).all()
