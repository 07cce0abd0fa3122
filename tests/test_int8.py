"""`convnets export --int8`: ONNX Runtime's static quantization calibrated on training images, the FP32 and INT8
top-1 compared on a validation set and the export refused above --max-accuracy-drop (a calibration set of blank
images is refused), the INT8 folder served by `serve --runtime onnxruntime` and written to a Triton repository as
the FP32 one is."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ONE_THREAD, ROOT, run_cli
from PIL import Image
from test_serve import free_port, image_bytes

from common.errors import UserError

ort = pytest.importorskip("onnxruntime", reason="needs the serve extra: pip install -e '.[serve]'")

VERDICT = re.compile(r"top-1 on (\d+) images of (\S+): FP32 ([\d.]+)%, INT8 ([\d.]+)% \(drop ([+-][\d.]+) points")
# 48 validation images: one image is 2.08 points of top-1, so the bar the good calibration must pass allows two.
MAX_DROP = "5"


def blank_images(folder: Path, n: int = 4) -> Path:
    """A calibration set of black images: every activation range it gives is a point, and real images saturate."""
    (folder / "blank").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "blank" / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def int8_export(trained_colors, tmp_path_factory):
    data, checkpoint = trained_colors
    out = tmp_path_factory.mktemp("int8")
    proc = run_cli("export", "--checkpoint", str(checkpoint), "--format", "onnx", "--int8", "--calibration-data",
                   str(data), "--check-data", str(data), "--max-accuracy-drop", MAX_DROP, "--out", str(out / "model"),
                   "--triton-repo", str(out / "triton"), "--model-name", "colors")  # fmt: skip
    return out, proc.stdout + proc.stderr


def test_int8_export_prints_both_top1_as_evaluate_counts_them(int8_export, trained_colors, cli):
    out, log = int8_export
    images, folder, fp32, int8, drop = VERDICT.search(log).groups()
    assert (int(images), folder) == (48, str(trained_colors[0] / "val"))
    assert float(fp32) - float(int8) <= float(MAX_DROP) and float(drop) == pytest.approx(float(fp32) - float(int8))
    # FP32's figure is `convnets evaluate`'s on the same folder (its pytorch backend: the same preprocessing).
    data, checkpoint = trained_colors
    evaluated = cli("evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--data-backend", "pytorch",
                    "--workers", "0", "--output", str(out / "eval"), "--json")  # fmt: skip
    assert json.loads(evaluated.stdout)["top1"] == pytest.approx(float(fp32), abs=0.005)
    meta = json.loads((out / "model" / "convnets.json").read_text())
    q = meta["quantization"]
    assert (meta["precision"], meta["format"], meta["model_file"]) == ("int8", "onnx", "model.onnx")
    assert (q["fp32_top1"], q["int8_top1"]) == pytest.approx((float(fp32), float(int8)), abs=0.005)
    # 96 training images, fewer than the 512 asked for by default: all of them, class by class.
    assert (q["calibration_images"], q["calibration_data"], q["check_images"]) == (96, str(data / "train"), 48)
    assert q["calibration_selection"].startswith("stratified") and q["max_accuracy_drop"] == float(MAX_DROP)


def test_int8_model_is_quantized_and_matches_its_own_top1(int8_export, trained_colors):
    """The file holds int8 weights between QuantizeLinear/DequantizeLinear pairs, takes and gives float32, and its
    top-1 recomputed here (PIL, torchvision's eval transform, the metadata's mean and std) is the one printed."""
    import onnx
    import torch
    from torchvision.transforms.v2 import functional as F

    from common.data import PipelineSpec, eval_transform, scan_split
    from common.images import open_rgb

    out, log = int8_export
    model = onnx.load(str(out / "model" / "model.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert sum(init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer) >= 20  # every conv + fc
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = json.loads((out / "model" / "convnets.json").read_text())
    transform = eval_transform(PipelineSpec(image_size=meta["image_size"], resize_size=meta["resize_size"]))
    mean, std = (torch.tensor(v).view(3, 1, 1) * 255 for v in (meta["mean"], meta["std"]))
    val = scan_split(trained_colors[0] / "val", classes=meta["classes"])
    batch = torch.stack([(transform(F.pil_to_tensor(open_rgb(f))).float() - mean) / std for f in val.files])
    session = ort.InferenceSession(str(out / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"input": batch.numpy()})[0].argmax(1)
    assert 100 * float((predicted == np.array(val.labels)).mean()) == pytest.approx(
        float(VERDICT.search(log).group(4)), abs=0.005
    )


def test_triton_repository_takes_the_int8_model(int8_export):
    out, _ = int8_export
    folder = out / "triton" / "colors"
    assert (folder / "1" / "model.onnx").read_bytes() == (out / "model" / "model.onnx").read_bytes()
    config = (folder / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "data_type: TYPE_FP32" in config
    assert json.loads((folder / "convnets.json").read_text())["precision"] == "int8"


def test_serve_onnxruntime_answers_from_the_int8_folder(int8_export):
    """`convnets serve --runtime onnxruntime --model-dir` on the INT8 folder, as a user starts it: its answers are
    the INT8 model's own on the same pixels."""
    from common.serving.metadata import ModelMetadata
    from common.serving.model import ImageDecoder

    httpclient = pytest.importorskip("tritonclient.http")
    out, _ = int8_export
    model_dir, port, log = out / "model", free_port(), out / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "common", "serve", "--runtime", "onnxruntime", "--model-dir", str(model_dir),
         "--port", str(port), "--model-name", "colors"],
        cwd=ROOT, env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}, stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
            assert time.time() < deadline, f"server not ready after 90 s:\n{log.read_text()}"
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        images = [image_bytes(i, size=40 + 7 * i) for i in range(4)]
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        inp = httpclient.InferInput("image", [len(images)], "BYTES")
        inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
        result = client.infer("colors", [inp])
        got, names = result.as_numpy("probabilities"), result.as_numpy("top_classes")
    finally:
        proc.terminate()
        proc.wait(30)
    meta = ModelMetadata.read(model_dir)
    decode = ImageDecoder(meta, 40_000_000, torch_resize=False)  # the server's own decoding without torch
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": np.stack([decode(b) for b in images])})[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # test_serve.image_bytes draws red, green, blue and yellow squares in turn: the INT8 model still tells them apart.
    assert [row[0].decode() for row in names] == ["red", "green", "blue", "yellow"]


def test_blank_calibration_images_are_refused_and_out_is_left_alone(trained_colors, tmp_path, cli):
    data, checkpoint = trained_colors
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier export's file")
    bad = blank_images(tmp_path / "blank")
    proc = cli("export", "--checkpoint", str(checkpoint), "--format", "onnx", "--int8", "--calibration-data", str(bad),
               "--check-data", str(data), "--max-accuracy-drop", MAX_DROP, "--out", str(out), check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: INT8 export refused: top-1 on 48 images" in proc.stderr
    _, _, fp32, int8, drop = VERDICT.search(proc.stderr).groups()
    assert float(drop) > float(MAX_DROP) and float(fp32) > float(int8)
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]  # no model, metadata or temporary file


def test_calibration_images_are_taken_class_by_class(trained_colors):
    from common.serving.quantize import calibration_images

    data, _ = trained_colors
    picked = calibration_images(data, 6)
    assert picked.root == data / "train"
    assert [(Path(f).parent.name, Path(f).name) for f in picked.files] == [
        ("blue", "000.png"), ("green", "000.png"), ("red", "000.png"), ("yellow", "000.png"), ("blue", "001.png"),
        ("green", "001.png")]  # fmt: skip
    assert calibration_images(data, 6).files == picked.files  # the same folder, the same images


@pytest.mark.parametrize(
    "options, message",
    [
        ({"format": "torchscript", "int8": True, "calibration_data": "d"}, "--int8 takes --format onnx or tensorrt"),
        ({"int8": True}, "--int8 needs --calibration-data DIR"),
        ({"int8": True, "calibration_data": "d", "calibration_images": 0}, "--calibration-images must be at least 1"),
        ({"int8": True, "calibration_data": "d", "max_accuracy_drop": -1.0}, "--max-accuracy-drop must not be neg"),
        ({"check_data": "d"}, "--check-data given without --int8"),
    ],
)
def test_int8_option_refusals(options, message):
    from common.serving.config import ExportConfig

    with pytest.raises(UserError, match=re.escape(message)):
        ExportConfig(checkpoint="c.pt", out="o", **options).check()


def test_tensorrt_int8_says_what_is_missing(trained_colors, tmp_path):
    import importlib.util

    import torch

    from common.serving.config import ExportConfig
    from common.serving.export import export_model

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are here: tests/test_gpu.py's territory")
    data, checkpoint = trained_colors
    with pytest.raises(UserError, match="^TensorRT INT8 export needs (the `tensorrt` Python package|a CUDA GPU)"):
        export_model(ExportConfig(checkpoint=str(checkpoint), format="tensorrt", out=str(tmp_path / "o"), int8=True,
                                  calibration_data=str(data)))  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_calibration_ranges_come_from_every_image_however_batched(trained_colors):
    """MinMax ranges are a min of mins: 96 images in 24 batches of 4 give the scales that 3 batches of 32 give, and
    the first 8 images alone give others (ONNX Runtime's CalibMaxIntermediateOutputs, which would have bounded the
    memory, drops whole sets of batches instead: microsoft/onnxruntime#18893)."""
    import dataclasses

    import onnx
    import torch
    from onnx import numpy_helper

    from common.serving.export import load_checkpoint_model, onnx_bytes
    from common.serving.quantize import calibration_images, quantize_onnx

    data, checkpoint = trained_colors
    model, meta = load_checkpoint_model(str(checkpoint), torch.device("cpu"))
    fp32 = onnx_bytes(model, meta)
    images = calibration_images(data, 96)

    def scales(int8: bytes) -> np.ndarray:
        graph = onnx.load_from_string(int8).graph
        values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        # The activations' scales: what calibration sets (the weights' come from the weights alone).
        names = [n.input[1] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in values]
        return np.array([float(values[name]) for name in names])

    whole = scales(quantize_onnx(fp32, meta, images, batch_size=32))
    assert len(whole) >= 10
    np.testing.assert_allclose(scales(quantize_onnx(fp32, meta, images, batch_size=4)), whole, rtol=1e-4)
    first = dataclasses.replace(images, files=images.files[:8], labels=images.labels[:8])
    assert not np.allclose(scales(quantize_onnx(fp32, meta, first, batch_size=4)), whole, rtol=1e-4)
