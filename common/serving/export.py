"""``convnets export``: a checkpoint to ONNX, TorchScript, a torch.export program or a TensorRT engine, each with
its class names and preprocessing (convnets.json, labels.txt), and optionally a Triton model repository. The graph
every export starts from, :func:`load_checkpoint_model`, is also what ``serve --checkpoint`` runs (in memory)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from common.atomic import ensure_writable
from common.checkpoint import atomic_write_text
from common.errors import UserError
from common.evaluation import class_probabilities
from common.serving.config import ExportConfig
from common.serving.metadata import LABELS_FILE, METADATA_FILE, ModelMetadata
from common.serving.quantize import int8_onnx_export, int8_tensorrt_export
from common.serving.tensorrt import CALIBRATION_CACHE, TensorrtRunner, build_engine, tensorrt_missing

log = logging.getLogger("convnets")

MODEL_FILES = {
    "onnx": "model.onnx",
    "torchscript": "model.pt",
    "exported-program": "model.pt2",
    "tensorrt": "model.plan",
}
# Triton's PyTorch (libtorch) backend maps tensors to TorchScript arguments by the `<name>__<index>` convention.
TORCHSCRIPT_NAMES = ("input__0", "probabilities__0")
TRITON_PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "tensorrt": "tensorrt_plan"}


class WithProbabilities(torch.nn.Module):
    """The exported graph ends in probabilities over the named classes (a softmax, or a sigmoid per label for a
    multi-label model), so a Triton client needs no post-processing (a model trained with a larger
    ``--num-classes`` than it had class folders has outputs that no name belongs to: they are left out)."""

    def __init__(self, model: torch.nn.Module, num_named: int, multilabel: bool = False):
        super().__init__()
        self.model, self.num_named, self.multilabel = model, num_named, multilabel

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the name becomes the graph's input name
        return class_probabilities(self.model(input), self.num_named, self.multilabel)


def load_checkpoint_model(path: str, device: torch.device) -> tuple[torch.nn.Module, ModelMetadata]:
    """The trained classifier (ending in probabilities) and its metadata, rebuilt as ``evaluate`` rebuilds it."""
    from common.data import IMAGENET_MEAN, IMAGENET_STD
    from common.inference import load_trained

    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist")
    trained = load_trained(path, device)
    meta = ModelMetadata(
        arch=trained.config["arch"],
        classes=trained.classes,
        image_size=trained.pipeline.image_size,
        resize_size=trained.pipeline.resize_size,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        channels_last=trained.pipeline.channels_last,
        multilabel=trained.multilabel,
        thresholds=trained.thresholds if trained.multilabel else None,
    )
    return WithProbabilities(trained.model, len(trained.classes), trained.multilabel).eval(), meta


def _example(meta: ModelMetadata, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, meta.image_size, meta.image_size)


def onnx_bytes(model: torch.nn.Module, meta: ModelMetadata, opset: int = 18, max_batch_size: int = 1024) -> bytes:
    """The model as ONNX with a dynamic batch axis (torch.onnx's dynamo exporter)."""
    model = model.cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch_size))
    buffer = io.BytesIO()
    # The exporter and its optimiser print progress lines on stdout: keep them out of the user's output.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (_example(meta),), input_names=[meta.input_name],
                                    output_names=[meta.output_name], dynamic_shapes=({0: batch},),
                                    opset_version=opset, dynamo=True, verbose=False)  # fmt: skip
    program.save(buffer)
    return buffer.getvalue()


def check_onnx(data: bytes, model: torch.nn.Module, meta: ModelMetadata, tolerance: float) -> float:
    """ONNX Runtime against PyTorch on one batch (of 3, not the traced 2, to prove the batch axis is dynamic)."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load_from_string(data))
    x = _example(meta, 3)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([meta.output_name], {meta.input_name: x.numpy()})[0]
    with torch.inference_mode():
        want = model.cpu()(x).numpy()
    return _compare(got, want, "ONNX Runtime", tolerance)


def _compare(got: np.ndarray, want: np.ndarray, what: str, tolerance: float) -> float:
    diff = float(np.abs(got - want).max())
    log.info("%s vs PyTorch on a batch of %d: largest absolute difference %.3g", what, len(want), diff)
    if not diff <= tolerance:
        raise UserError(
            f"{what} differs from PyTorch by {diff:.3g} (more than --tolerance {tolerance}): export refused"
        )
    return diff


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def export_model(cfg: ExportConfig) -> Path:
    """Write the export folder (and the Triton repository when asked); returns the model file.

    Every check (against PyTorch, and with ``--int8`` the top-1 against FP32) runs before anything is written:
    a refused export leaves ``--out`` as it was."""
    cfg.check()
    if cfg.triton_repo and cfg.format not in TRITON_PLATFORMS:
        raise UserError(
            f"--triton-repo takes onnx, torchscript or tensorrt exports (Triton has no {cfg.format} backend)"
        )
    if cfg.format == "tensorrt":
        missing = tensorrt_missing(cfg.int8)
        if missing:
            raise UserError(f"TensorRT {'INT8 ' if cfg.int8 else ''}export needs {missing}")
    model, meta = load_checkpoint_model(cfg.checkpoint, torch.device("cpu"))
    if cfg.int8 and meta.multilabel:
        raise UserError("--int8 checks top-1 on single-label data; this checkpoint is multi-label")
    model = model.to(memory_format=torch.contiguous_format)
    if cfg.format == "torchscript":
        meta.input_name, meta.output_name = TORCHSCRIPT_NAMES
    meta = dataclasses.replace(meta, format=cfg.format, model_file=MODEL_FILES[cfg.format], channels_last=False)
    out = Path(cfg.out)
    ensure_writable(out, "the export")  # before the export, its check and a TensorRT build (minutes)
    path = out / MODEL_FILES[cfg.format]
    x = _example(meta, 3)
    beside: dict[str, bytes] = {}  # other files of the export folder (TensorRT's calibration cache)

    if cfg.format in ("onnx", "tensorrt"):
        data = onnx_bytes(model, meta, cfg.opset, cfg.max_batch_size)
        check_onnx(data, model, meta, cfg.tolerance)
        if cfg.format == "onnx" and cfg.int8:
            data, meta = int8_onnx_export(data, meta, cfg)
        elif cfg.format == "tensorrt" and cfg.int8:
            data, meta, beside[CALIBRATION_CACHE] = int8_tensorrt_export(data, meta, cfg)
        elif cfg.format == "tensorrt":
            data, _ = build_engine(data, meta, cfg.max_batch_size)
            # fp16 weights and activations: probabilities move by up to about 1e-3, so the bar is looser.
            with torch.inference_mode():
                _compare(TensorrtRunner(data, meta)(x.numpy()), model(x).numpy(), "TensorRT (fp16)",
                         max(cfg.tolerance, 1e-2))  # fmt: skip
            meta = dataclasses.replace(meta, precision="fp16")
    elif cfg.format == "torchscript":
        # TorchScript is deprecated in favour of torch.export, but it is what Triton's PyTorch backend loads.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.trace(model, _example(meta))
            _compare(scripted(x).detach().numpy(), model(x).detach().numpy(), "TorchScript", cfg.tolerance)
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: meta.to_json()})
        data = buffer.getvalue()
    else:
        batch = torch.export.Dim("batch", min=1, max=max(2, cfg.max_batch_size))
        program = torch.export.export(model, (_example(meta),), dynamic_shapes=({0: batch},))
        with torch.inference_mode():
            _compare(program.module()(x).numpy(), model(x).numpy(), "torch.export program", cfg.tolerance)
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={METADATA_FILE: meta.to_json()})
        data = buffer.getvalue()

    out.mkdir(parents=True, exist_ok=True)
    _write_bytes(path, data)
    for name, content in beside.items():
        _write_bytes(out / name, content)
    atomic_write_text(out / METADATA_FILE, meta.to_json())
    atomic_write_text(out / LABELS_FILE, "".join(f"{c}\n" for c in meta.classes))
    log.info("wrote %s (%s %s, %d classes, input %s 3x%dx%d) with %s", path, cfg.format, meta.precision,
             len(meta.classes), meta.input_name, meta.image_size, meta.image_size,
             ", ".join([*beside, METADATA_FILE, LABELS_FILE]))  # fmt: skip
    if cfg.triton_repo:
        write_triton_repo(Path(cfg.triton_repo), cfg.model_name or meta.arch, path, meta, cfg)
    return path


def triton_config(name: str, meta: ModelMetadata, fmt: str, max_batch_size: int, queue_delay_ms: float) -> str:
    """config.pbtxt: names, types and dims (batch axis implied by max_batch_size), dynamic batching, instances."""
    # KIND_AUTO puts the instance on a GPU when Triton has one and on the CPU otherwise; a TensorRT engine needs a GPU.
    kind = "KIND_GPU" if fmt == "tensorrt" else "KIND_AUTO"
    s = meta.image_size
    return f"""name: "{name}"
platform: "{TRITON_PLATFORMS[fmt]}"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{meta.input_name}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, {s}, {s} ]
  }}
]
output [
  {{
    name: "{meta.output_name}"
    data_type: TYPE_FP32
    dims: [ {len(meta.classes)} ]
    label_filename: "{LABELS_FILE}"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {round(queue_delay_ms * 1000)}
}}
instance_group [
  {{
    count: 1
    kind: {kind}
  }}
]
"""


def write_triton_repo(repo: Path, name: str, model_file: Path, meta: ModelMetadata, cfg: ExportConfig) -> Path:
    """``repo/<name>/{config.pbtxt, labels.txt, convnets.json, 1/<model file>}``: `tritonserver --model-repository`."""
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    tmp = folder / "1" / f".{model_file.name}.tmp"
    shutil.copyfile(model_file, tmp)
    tmp.replace(folder / "1" / model_file.name)
    atomic_write_text(folder / "config.pbtxt",
                      triton_config(name, meta, cfg.format, cfg.max_batch_size, cfg.max_queue_delay_ms))  # fmt: skip
    atomic_write_text(folder / LABELS_FILE, "".join(f"{c}\n" for c in meta.classes))
    # Not read by Triton: tells a client the resize, crop, mean and std the model expects.
    atomic_write_text(folder / METADATA_FILE, meta.to_json())
    log.info("wrote Triton model repository %s (model %s): tritonserver --model-repository %s", repo, name, repo)
    return folder
