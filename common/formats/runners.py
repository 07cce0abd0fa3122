"""The formats a trained checkpoint can run in, as a registry of named runners.

A runner is built from a :class:`Subject` (the checkpoint's model, its metadata and the exports made from it,
each made once and shared) and is a callable: a normalised float32 NCHW batch on the host -> probabilities on
the host. Every format is fed and read the same way, so on a GPU the copies in and out are in every format's time,
as they are in a server's. A format this machine cannot run raises :class:`Unavailable` with the reason."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.data import ImageList
from common.serving.metadata import ModelMetadata

Runner = Callable[[torch.Tensor], "np.ndarray | torch.Tensor"]


class Unavailable(Exception):
    """This machine cannot run the format; the message says why (what is missing)."""


@dataclass(frozen=True)
class Format:
    name: str
    build: Callable[[Subject], Runner]
    device: str  # where it computes: "cpu", "cuda", or "auto" (the benchmark's device)
    precision: str
    description: str


FORMATS: dict[str, Format] = {}


def register(name: str, device: str, precision: str, description: str):
    """Add the decorated ``build(subject) -> runner`` to :data:`FORMATS` under ``name`` (names are unique)."""

    def add(build: Callable[[Subject], Runner]) -> Callable[[Subject], Runner]:
        if name in FORMATS:
            raise ValueError(f"format {name!r} is registered twice")
        FORMATS[name] = Format(name, build, device, precision, description)
        return build

    return add


@dataclass
class Subject:
    """What every runner starts from. ``model`` is the checkpoint's classifier ending in probabilities, on the CPU
    and contiguous; the exports are made on first use and shared by the runners that read them."""

    model: torch.nn.Module
    meta: ModelMetadata
    device: torch.device
    max_batch_size: int
    threads: int
    calibration: ImageList | None = None  # None: no training images to calibrate INT8 formats on
    calibration_missing: str = ""
    _cache: dict = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def torch_model(self, memory_format=torch.contiguous_format) -> torch.nn.Module:
        return copy.deepcopy(self.model).to(self.device, memory_format=memory_format).eval()

    def onnx_fp32(self) -> bytes:
        from common.serving.export import onnx_bytes

        return self.once("onnx", lambda: onnx_bytes(self.model, self.meta, max_batch_size=self.max_batch_size))

    def onnx_int8(self) -> bytes:
        """The FP32 export quantized as ``convnets export --int8`` quantizes it (ONNX Runtime, QDQ)."""
        from common.serving.quantize import quantize_onnx

        if self.calibration is None:
            raise Unavailable(self.calibration_missing)
        return self.once("onnx-int8", lambda: quantize_onnx(self.onnx_fp32(), self.meta, self.calibration))


def _torch_runner(model: torch.nn.Module, device: torch.device, memory_format=torch.contiguous_format) -> Runner:
    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        return model(x.to(device).contiguous(memory_format=memory_format)).float().cpu().numpy()

    return run


def _cuda_needed(subject: Subject) -> None:
    if subject.device.type != "cuda":
        raise Unavailable("needs a CUDA GPU: the benchmark runs on the CPU here (no usable GPU, or --device cpu)")


@register("eager", "auto", "fp32", "PyTorch eager, contiguous (NCHW) tensors")
def _eager(subject: Subject) -> Runner:
    return _torch_runner(subject.torch_model(), subject.device)


@register("channels_last", "auto", "fp32", "PyTorch eager, channels_last (NHWC) weights and inputs")
def _channels_last(subject: Subject) -> Runner:
    return _torch_runner(subject.torch_model(torch.channels_last), subject.device, torch.channels_last)


@register("torch.compile", "auto", "fp32", "torch.compile (inductor, mode default, static shapes)")
def _compiled(subject: Subject) -> Runner:
    # Compilation happens at the first call of each batch size, in the warm-up; a machine without a C++ compiler
    # fails there, and the benchmark lists the format with that error.
    return _torch_runner(torch.compile(subject.torch_model(), dynamic=False), subject.device)


@register("torchscript", "auto", "fp32", "TorchScript (traced, frozen)")
def _torchscript(subject: Subject) -> Runner:
    model = subject.torch_model()
    example = torch.randn(2, 3, subject.meta.image_size, subject.meta.image_size, device=subject.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about TorchScript's deprecation
        scripted = torch.jit.freeze(torch.jit.trace(model, example))
    return _torch_runner(scripted, subject.device)


@register("torch.export", "auto", "fp32", "torch.export program (dynamic batch axis), as `export --format "
          "exported-program` writes it")  # fmt: skip
def _exported(subject: Subject) -> Runner:
    model = subject.torch_model()
    example = torch.randn(2, 3, subject.meta.image_size, subject.meta.image_size, device=subject.device)
    batch = torch.export.Dim("batch", min=1, max=max(2, subject.max_batch_size))
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    return _torch_runner(program.module(), subject.device)


def _ort_session(model: bytes, provider: str, threads: int):
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise Unavailable(f"ONNX Runtime {ort.__version__} here has no {provider} (onnxruntime-gpu has it)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=[provider])
    name, output = session.get_inputs()[0].name, session.get_outputs()[0].name
    return lambda x: session.run([output], {name: x.numpy()})[0]


def _onnxruntime_needed() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise Unavailable("needs onnxruntime (pip install -e '.[serve]')") from None


@register("onnxruntime", "cpu", "fp32", "ONNX Runtime, CPU execution provider, the `export --format onnx` model")
def _onnxruntime(subject: Subject) -> Runner:
    _onnxruntime_needed()
    return _ort_session(subject.onnx_fp32(), "CPUExecutionProvider", subject.threads)


@register("onnxruntime-int8", "cpu", "int8", "ONNX Runtime, CPU execution provider, the `export --int8` model "
          "(QDQ, per-channel weights)")  # fmt: skip
def _onnxruntime_int8(subject: Subject) -> Runner:
    _onnxruntime_needed()
    return _ort_session(subject.onnx_int8(), "CPUExecutionProvider", subject.threads)


@register("onnxruntime-cuda", "cuda", "fp32", "ONNX Runtime, CUDA execution provider")
def _onnxruntime_cuda(subject: Subject) -> Runner:
    _onnxruntime_needed()
    _cuda_needed(subject)
    return _ort_session(subject.onnx_fp32(), "CUDAExecutionProvider", subject.threads)


def _tensorrt(subject: Subject, int8: bool) -> Runner:
    from common.serving.quantize import calibration_batches
    from common.serving.tensorrt import TensorrtRunner, build_engine, tensorrt_missing

    missing = tensorrt_missing(int8)
    if missing:
        raise Unavailable(f"needs {missing}")
    batches = None
    if int8:
        if subject.calibration is None:
            raise Unavailable(subject.calibration_missing)
        batches = calibration_batches(subject.calibration, subject.meta)
    engine, _ = build_engine(subject.onnx_fp32(), subject.meta, subject.max_batch_size, batches)
    run = TensorrtRunner(engine, subject.meta)
    return lambda x: run(x.numpy())


@register("tensorrt-fp16", "cuda", "fp16", "TensorRT engine, fp16, as `export --format tensorrt` builds it")
def _tensorrt_fp16(subject: Subject) -> Runner:
    return _tensorrt(subject, int8=False)


@register("tensorrt-int8", "cuda", "int8", "TensorRT engine, INT8 calibrated on the same images (fp16 elsewhere)")
def _tensorrt_int8(subject: Subject) -> Runner:
    return _tensorrt(subject, int8=True)


@functools.cache
def _openvino_core():
    try:
        import openvino
    except ImportError:
        raise Unavailable("needs OpenVINO (pip install -e '.[openvino]')") from None
    return openvino.Core()


def _openvino(subject: Subject, model: bytes) -> Runner:
    """OpenVINO's CPU plugin on the ONNX model (it reads ONNX, QDQ INT8 included, without a conversion step)."""
    import tempfile

    core = _openvino_core()
    with tempfile.TemporaryDirectory(prefix="convnets-formats-") as tmp:  # OpenVINO reads ONNX from a file
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model)
        # One stream over the benchmark's threads (the LATENCY hint), as every other runner computes a batch.
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": subject.threads,
                                                         "PERFORMANCE_HINT": "LATENCY"})  # fmt: skip
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x.numpy()})[0].copy()


@register("openvino", "cpu", "fp32", "OpenVINO CPU plugin, the `export --format onnx` model")
def _openvino_fp32(subject: Subject) -> Runner:
    return _openvino(subject, subject.onnx_fp32())


@register("openvino-int8", "cpu", "int8", "OpenVINO CPU plugin, the `export --int8` model (QDQ)")
def _openvino_int8(subject: Subject) -> Runner:
    return _openvino(subject, subject.onnx_int8())
