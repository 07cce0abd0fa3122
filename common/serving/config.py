"""Typed options of ``convnets export`` and ``convnets serve`` (turned into argparse by common.config)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from common.config import opt
from common.errors import UserError

EXPORT_FORMATS = ("onnx", "torchscript", "exported-program", "tensorrt")
RUNTIMES = ("torch", "onnxruntime")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # ONNX Runtime's calibrators


@dataclass
class ExportConfig:
    checkpoint: str | None = opt(None, "training checkpoint to export (required)")
    format: str = opt("onnx", "what to write", EXPORT_FORMATS)
    out: str | None = opt(None, "folder for the model file, convnets.json and labels.txt (required)")
    triton_repo: str | None = opt(None, "also write an NVIDIA Triton model repository here")
    model_name: str | None = opt(None, "model name in the Triton repository (default: the checkpoint's arch)")
    max_batch_size: int = opt(64, "largest batch: Triton's max_batch_size and the top of TensorRT's profile")
    max_queue_delay_ms: float = opt(2.0, "Triton dynamic_batching queue delay")
    opset: int = opt(18, "ONNX opset")
    tolerance: float = opt(1e-3, "largest absolute difference of probabilities allowed between PyTorch and the export")
    int8: bool = opt(False, "quantize to INT8 (onnx: ONNX Runtime static quantization; tensorrt: an INT8 engine), "
                     "calibrated on --calibration-data and checked on --check-data")  # fmt: skip
    calibration_data: str | None = opt(None, "--int8: ImageFolder root (its train/ is used) or split folder whose "
                                       "images set the activation ranges", metavar="DIR")  # fmt: skip
    calibration_images: int = opt(512, "--int8: calibration images, taken class by class in turn", metavar="N")
    calibration_method: str = opt("minmax", "--int8 --format onnx: how ONNX Runtime turns the calibration "
                                  "activations into ranges", CALIBRATION_METHODS)  # fmt: skip
    check_data: str | None = opt(None, "--int8: labelled folder (its val/, or the folder itself) on which the INT8 "
                                 "and FP32 models' top-1 are compared (default: --calibration-data's val/)",
                                 metavar="DIR")  # fmt: skip
    max_accuracy_drop: float = opt(1.0, "--int8: refuse the export when INT8 top-1 is more than this many points "
                                   "below FP32's on --check-data", metavar="POINTS")  # fmt: skip

    def check(self) -> ExportConfig:
        if not self.checkpoint:
            raise UserError("export needs --checkpoint FILE")
        if not self.out:
            raise UserError("export needs --out DIR")
        if self.max_batch_size < 1:
            raise UserError(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        if self.int8:
            if self.format not in ("onnx", "tensorrt"):
                raise UserError(f"--int8 takes --format onnx or tensorrt, not {self.format}")
            if not self.calibration_data:
                raise UserError("--int8 needs --calibration-data DIR (training images that set the INT8 ranges)")
            if self.calibration_images < 1:
                raise UserError(f"--calibration-images must be at least 1, got {self.calibration_images}")
            if not self.max_accuracy_drop >= 0:
                raise UserError(f"--max-accuracy-drop must not be negative, got {self.max_accuracy_drop}")
        else:
            given = [f"--{n.replace('_', '-')}" for n in ("calibration_data", "check_data") if getattr(self, n)]
            if given:
                raise UserError(f"{' and '.join(given)} given without --int8, the export they belong to")
        return self


@dataclass
class ServeConfig:
    checkpoint: str | None = opt(None, "training checkpoint to serve")
    model_dir: str | None = opt(None, "or an export folder (onnx or torchscript) written by `convnets export`")
    model_name: str | None = opt(None, "name in the URLs /v2/models/NAME (default: the checkpoint's arch)")
    runtime: str = opt("torch", "what runs the model (onnxruntime exports the checkpoint to ONNX at start-up)",
                       RUNTIMES)  # fmt: skip
    device: str = opt("auto", "auto, cuda, cuda:N or cpu for the torch runtime (auto: a usable GPU, else the CPU)")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 in a container)")
    port: int = opt(8000, "TCP port")
    max_batch_size: int = opt(32, "largest batch the dynamic batcher gathers (1: no batching)")
    max_queue_delay_ms: float = opt(5.0, "longest a request waits for others to join its batch")
    max_body_mb: float = opt(16.0, "largest request body; larger ones get 413")
    max_image_pixels: int = opt(40_000_000, "largest decoded image (width x height); larger ones get 400")
    workers: int = opt(2, "threads decoding and preprocessing image bytes (kept off the event loop)")
    threads: int | None = opt(None, "CPU threads of one forward pass (torch's intra-op threads, ONNX Runtime's "
                              "intra-op pool; default: the usable cores less one, shared among the instances, so "
                              "that the HTTP loop and the decoding keep a core of their own)")  # fmt: skip
    instances: int = opt(2, "model instances computing batches at the same time (Triton's instance group), each on "
                         "--threads threads: while one computes, the other's batch is gathered, decoded and "
                         "answered")  # fmt: skip
    top_k: int = opt(5, "class names and scores returned per image unless a request asks otherwise")
    index: str | None = opt(None, "an index folder written by `convnets embed` with this checkpoint: the server then "
                            "also answers POST /v2/models/NAME/similar?k=K")  # fmt: skip

    @property
    def model_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, (cores - 1) // self.instances)

    def check(self) -> ServeConfig:
        if bool(self.checkpoint) == bool(self.model_dir):
            raise UserError("serve needs exactly one of --checkpoint FILE or --model-dir DIR")
        if self.index and not self.checkpoint:
            # An export ends in probabilities: the penultimate layer a query must be embedded with is not in it.
            raise UserError("serve --index needs --checkpoint FILE (the one the index was built with), not --model-dir")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        for name, low in (
            ("max_batch_size", 1),
            ("workers", 1),
            ("instances", 1),
            ("top_k", 1),
            ("max_image_pixels", 1),
            ("port", 0),
        ):
            if getattr(self, name) < low:
                raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        for name in ("max_queue_delay_ms", "max_body_mb"):
            if not getattr(self, name) >= 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        return self
