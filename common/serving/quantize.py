"""INT8 exports: ONNX Runtime's static quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on
training images preprocessed as ``evaluate`` preprocesses them, and the check that refuses an INT8 model whose
top-1 on a validation set fell more than ``--max-accuracy-drop`` points below its FP32 original's.

The calibration images are chosen deterministically: the classes' sorted files taken in turn (the first image of
every class, then the second of every class, ...) until ``--calibration-images`` are picked, so that every class
is represented even when N is small, and the same folder always gives the same INT8 model."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from common.data import ImageList, scan_split
from common.errors import UserError
from common.serving.accuracy import eval_loader, labelled_images, split_folder, top1
from common.serving.config import ExportConfig
from common.serving.metadata import ModelMetadata

log = logging.getLogger("convnets")

SELECTION = "stratified: the sorted files of each class taken in turn (first of each class, then second, ...)"
CALIBRATION_BATCH = 32


def calibration_images(root: str | Path, n: int) -> ImageList:
    """``n`` images of ``root/train`` (or of ``root`` itself), chosen as :data:`SELECTION` says."""
    images = scan_split(split_folder(root, "train"))
    if not len(images):
        raise UserError(f"calibration folder {images.root} holds no image")
    labels = [0] * len(images) if images.multilabel else images.labels  # labels are not used, only the images
    seen: Counter = Counter()
    rank = []
    for label in labels:  # files are sorted within each class: an image's rank is its place in its class
        rank.append(seen[label])
        seen[label] += 1
    order = sorted(range(len(images)), key=lambda i: (rank[i], labels[i]))[:n]
    if len(order) < n:
        log.info("calibration: %s holds %d images, fewer than --calibration-images %d: all of them are used",
                 images.root, len(order), n)  # fmt: skip
    return dataclasses.replace(images, files=[images.files[i] for i in order], labels=[labels[i] for i in order],
                               multilabel=False, sizes=None)  # fmt: skip


def calibration_batches(images: ImageList, meta: ModelMetadata, batch_size: int = CALIBRATION_BATCH):
    """The calibration images as normalised float32 NCHW arrays, through ``evaluate``'s pipeline."""
    for x, _ in eval_loader(images, meta, batch_size):
        yield x.numpy()


def quantize_onnx(fp32: bytes, meta: ModelMetadata, images: ImageList, method: str = "minmax",
                  batch_size: int = CALIBRATION_BATCH) -> bytes:  # fmt: skip
    """The FP32 ONNX model quantized to INT8 by ONNX Runtime (QDQ: QuantizeLinear/DequantizeLinear pairs around
    int8 weights, per output channel, and uint8 activations whose ranges the calibration images set). Inputs and
    outputs stay float32, so a server or Triton feeds it exactly as it feeds the FP32 model.

    ONNX Runtime keeps every calibration batch's activations (every tensor of the graph) until the end: the memory
    grows with the images and with their size (49 times more per image at 224 px than at 32 px); where it does not
    fit, lower ``--calibration-images``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = calibration_batches(images, meta, batch_size)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {meta.input_name: batch}

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="convnets-int8-") as tmp:
        src, prepared, out = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        # ONNX Runtime's recommended first step: shape inference, and its graph optimisations (BatchNorm folded into
        # the convolutions), so that the quantized graph has one scale per fused convolution, not one per layer.
        quant_pre_process(str(src), str(prepared))
        quantize_static(
            str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
            # Not CalibMaxIntermediateOutputs, which would bound that memory: in ONNX Runtime up to 1.32 at least it
            # drops each full set of batches without computing their ranges (microsoft/onnxruntime#18893).
        )  # fmt: skip
        return out.read_bytes()


@dataclasses.dataclass
class AccuracyCheck:
    """Top-1 (percent) of the FP32 and INT8 models on the same images, and the limit the drop is held to."""

    fp32_top1: float
    int8_top1: float
    images: int
    data: str
    max_drop: float

    @property
    def drop(self) -> float:
        return self.fp32_top1 - self.int8_top1

    def verdict(self) -> str:
        return (f"top-1 on {self.images} images of {self.data}: FP32 {self.fp32_top1:.2f}%, INT8 {self.int8_top1:.2f}% "
                f"(drop {self.drop:+.2f} points, limit --max-accuracy-drop {self.max_drop:g})")  # fmt: skip


def check_accuracy(fp32_predict, int8_predict, meta: ModelMetadata, check_data: str, max_drop: float,
                   what: str = "INT8", batch_size: int = 64) -> AccuracyCheck:  # fmt: skip
    """Both models' top-1 on ``check_data``'s validation images, printed; a UserError above ``max_drop``."""
    images = labelled_images(check_data, meta)
    loader = eval_loader(images, meta, batch_size)
    check = AccuracyCheck(top1(fp32_predict, loader, meta).top1, top1(int8_predict, loader, meta).top1, len(images),
                          str(images.root), max_drop)  # fmt: skip
    log.info("%s", check.verdict())
    if check.drop > max_drop:
        raise UserError(f"{what} export refused: {check.verdict()}. Calibrate on more, or more representative, "
                        "training images (--calibration-data, --calibration-images)")  # fmt: skip
    return check


def onnx_predict(model: bytes, threads: int | None = None):
    """ONNX Runtime on the CPU: a normalised batch (torch or numpy) -> probabilities."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name, output = session.get_inputs()[0].name, session.get_outputs()[0].name

    def predict(x):
        return session.run([output], {name: np.ascontiguousarray(np.asarray(x, dtype=np.float32))})[0]

    return predict


def resolve_check_data(cfg: ExportConfig) -> str:
    """``--check-data``, or the calibration folder's ``val/`` when not given (said in one line)."""
    if cfg.check_data:
        return cfg.check_data
    val = Path(cfg.calibration_data) / "val"
    if not val.is_dir():
        raise UserError(f"--int8 checks top-1 on a validation set: pass --check-data DIR ({cfg.calibration_data} has "
                        "no val/ folder to default to)")  # fmt: skip
    log.info("accuracy check on %s (no --check-data given: the calibration folder's val/)", val)
    return str(val)


def calibration_record(cfg: ExportConfig, images: ImageList, check: AccuracyCheck, engine: str) -> dict:
    """What ``convnets.json`` says about the INT8 model: how it was quantized, on what, and what it scored."""
    return {
        "engine": engine,
        "calibration_data": str(images.root),
        "calibration_images": len(images),
        "calibration_selection": SELECTION,
        "calibration_method": cfg.calibration_method,
        "check_data": check.data,
        "check_images": check.images,
        "fp32_top1": round(check.fp32_top1, 4),
        "int8_top1": round(check.int8_top1, 4),
        "max_accuracy_drop": cfg.max_accuracy_drop,
    }


def int8_onnx_export(fp32: bytes, meta: ModelMetadata, cfg: ExportConfig) -> tuple[bytes, ModelMetadata]:
    """``--format onnx --int8``: the quantized model and its metadata, or a UserError when its top-1 fell too far."""
    check_data = resolve_check_data(cfg)
    images = calibration_images(cfg.calibration_data, cfg.calibration_images)
    log.info("INT8: calibrating on %d images of %s (%s), %s ranges", len(images), images.root, SELECTION,
             cfg.calibration_method)  # fmt: skip
    int8 = quantize_onnx(fp32, meta, images, cfg.calibration_method)
    check = check_accuracy(onnx_predict(fp32), onnx_predict(int8), meta, check_data, cfg.max_accuracy_drop)
    quantization = calibration_record(cfg, images, check, "onnxruntime static quantization, QDQ, per-channel int8 "
                                      "weights, uint8 activations")  # fmt: skip
    return int8, dataclasses.replace(meta, precision="int8", quantization=quantization)


def int8_tensorrt_export(fp32: bytes, meta: ModelMetadata, cfg: ExportConfig) -> tuple[bytes, ModelMetadata, bytes]:
    """``--format tensorrt --int8``: an engine calibrated by TensorRT's entropy calibrator on the same images as
    ONNX Runtime's INT8 (a whole number of calibration batches), its top-1 checked against the FP32 ONNX model's
    in ONNX Runtime; returns the engine, its metadata and the calibration cache to store beside it."""
    from common.serving.tensorrt import TensorrtRunner, build_engine

    check_data = resolve_check_data(cfg)
    images = calibration_images(cfg.calibration_data, cfg.calibration_images)
    if len(images) < CALIBRATION_BATCH:
        raise UserError(f"TensorRT calibrates in batches of {CALIBRATION_BATCH}: {images.root} gave {len(images)} "
                        "images (raise --calibration-images or give a larger folder)")  # fmt: skip
    log.info("TensorRT INT8: calibrating on %d images of %s (%s)", len(images) // CALIBRATION_BATCH * CALIBRATION_BATCH,
             images.root, SELECTION)  # fmt: skip
    engine, cache = build_engine(fp32, meta, cfg.max_batch_size, calibration_batches(images, meta),
                                 CALIBRATION_BATCH)  # fmt: skip
    check = check_accuracy(onnx_predict(fp32), TensorrtRunner(engine, meta), meta, check_data, cfg.max_accuracy_drop,
                           "TensorRT INT8", min(64, cfg.max_batch_size))  # fmt: skip
    quantization = calibration_record(cfg, images, check, "TensorRT INT8 (entropy calibrator 2), fp16 elsewhere")
    quantization["calibration_method"] = "tensorrt-entropy"
    return engine, dataclasses.replace(meta, precision="int8", quantization=quantization), cache or b""
