"""`convnets export`: ONNX checked against PyTorch with a dynamic batch axis, TorchScript and torch.export with
their metadata, a Triton repository whose config.pbtxt parses as Triton's ModelConfig, and the refusals."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_serve import CLASSES, MODEL, write_tiny_checkpoint

from common.errors import UserError

pytest.importorskip("onnxruntime", reason="needs the serve extra: pip install -e '.[serve]'")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("export") / "tiny.pt")


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    from common.serving.export import load_checkpoint_model

    model, _ = load_checkpoint_model(str(checkpoint), torch.device("cpu"))
    return model


def batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def onnx_export(checkpoint, tmp_path_factory):
    """One CLI export (ONNX + Triton repository) shared by the tests below: the exporter takes seconds."""
    out = tmp_path_factory.mktemp("onnx")
    proc = run_cli("export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out / "model"),
                   "--triton-repo", str(out / "triton"), "--model-name", "colors",
                   "--max-batch-size", "16")  # fmt: skip
    return out, proc.stdout + proc.stderr


def test_onnx_round_trip_with_dynamic_batch(onnx_export, torch_model):
    import onnxruntime as ort

    out, log = onnx_export
    assert "ONNX Runtime vs PyTorch on a batch of 3: largest absolute difference" in log
    session = ort.InferenceSession(str(out / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input" and not isinstance(session.get_inputs()[0].shape[0], int)
    for n in (1, 5):
        got = session.run(["probabilities"], {"input": batch(n)})[0]
        with torch.inference_mode():
            np.testing.assert_allclose(got, torch_model(torch.from_numpy(batch(n))).numpy(), atol=1e-5)


def test_export_carries_classes_and_preprocessing(onnx_export):
    out, _ = onnx_export
    meta = json.loads((out / "model" / "convnets.json").read_text())
    assert meta["classes"] == CLASSES and meta["arch"] == MODEL
    assert (meta["image_size"], meta["resize_size"], meta["format"]) == (32, 36, "onnx")
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert (out / "model" / "labels.txt").read_text().split() == CLASSES


def _model_config_pb2():
    """Triton's own ModelConfig schema, shipped inside tritonclient (its grpc package needs grpcio to import)."""
    tritonclient = pytest.importorskip("tritonclient")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        pytest.skip("tritonclient without model_config_pb2.py")
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_repository_files(onnx_export):
    from google.protobuf import text_format

    out, _ = onnx_export
    folder = out / "triton" / "colors"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1/model.onnx", "config.pbtxt", "convnets.json", "labels.txt"]  # fmt: skip
    assert (folder / "1" / "model.onnx").read_bytes() == (out / "model" / "model.onnx").read_bytes()
    pb2 = _model_config_pb2()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("colors", "onnxruntime_onnx", 16)
    assert [(i.name, pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("input", "TYPE_FP32", [3, 32, 32])]  # fmt: skip
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [("probabilities", [4], "labels.txt")]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_AUTO"
    assert (folder / "labels.txt").read_text().split() == CLASSES


def test_serve_runtime_from_onnx_export_folder(onnx_export, torch_model):
    """`serve --model-dir` needs nothing but the export folder."""
    from common.serving.model import load_runtime

    out, _ = onnx_export
    runtime = load_runtime(None, str(out / "model"), "torch", None)
    assert runtime.name == "onnxruntime" and runtime.meta.classes == CLASSES
    with torch.inference_mode():
        np.testing.assert_allclose(runtime(batch(2)), torch_model(torch.from_numpy(batch(2))).numpy(), atol=1e-5)


def test_serve_runtimes_compute_with_the_threads_asked_for(onnx_export, checkpoint):
    """`serve --threads N` sizes the forward pass's thread pool of either runtime; the default leaves a core to
    the HTTP loop (issue 17: on 2 cores the model's second thread fought the server's own work)."""
    from common.errors import UserError
    from common.serving.config import ServeConfig
    from common.serving.model import load_runtime

    out, _ = onnx_export
    onnx = load_runtime(None, str(out / "model"), "torch", None, threads=1)
    assert onnx.session.get_session_options().intra_op_num_threads == 1
    before = torch.get_num_threads()
    try:
        load_runtime(str(checkpoint), None, "torch", "cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    cores = len(os.sched_getaffinity(0))
    assert ServeConfig(checkpoint="c").model_threads == max(1, cores - 1)
    assert ServeConfig(checkpoint="c", threads=3).model_threads == 3
    with pytest.raises(UserError, match="--threads must be at least 1, got 0"):
        ServeConfig(checkpoint="c", threads=0).check()


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torchscript_and_exported_program(checkpoint, torch_model, tmp_path, fmt):
    from common.serving.config import ExportConfig
    from common.serving.export import export_model

    path = export_model(ExportConfig(checkpoint=str(checkpoint), format=fmt, out=str(tmp_path)))
    meta = json.loads((tmp_path / "convnets.json").read_text())
    assert meta["classes"] == CLASSES and meta["model_file"] == path.name
    x = torch.from_numpy(batch(5))  # traced with 2: the batch axis must stay free
    extra = {"convnets.json": ""}
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path), _extra_files=extra)
        assert meta["input_name"] == "input__0"  # Triton's libtorch backend naming
    else:
        loaded = torch.export.load(str(path), extra_files=extra).module()
    assert json.loads(extra["convnets.json"])["classes"] == CLASSES
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), torch_model(x).numpy(), atol=1e-5)


def test_refusals(checkpoint, tmp_path):
    from common.serving.config import ExportConfig
    from common.serving.export import export_model

    with pytest.raises(UserError, match="Triton has no exported-program backend"):
        export_model(ExportConfig(checkpoint=str(checkpoint), format="exported-program", out=str(tmp_path),
                                  triton_repo=str(tmp_path / "t")))  # fmt: skip
    with pytest.raises(UserError, match="does not exist"):
        export_model(ExportConfig(checkpoint=str(tmp_path / "missing.pt"), out=str(tmp_path)))
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        with pytest.raises(UserError, match="^TensorRT export needs (the `tensorrt` Python package|a CUDA GPU)"):
            export_model(ExportConfig(checkpoint=str(checkpoint), format="tensorrt", out=str(tmp_path)))
