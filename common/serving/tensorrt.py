"""TensorRT engines built from the ONNX export: fp16, or INT8 calibrated on the same images as ONNX Runtime's INT8
(TensorRT's entropy calibrator, its cache kept beside the engine), and a runner that executes an engine on torch's
CUDA tensors. Nothing here imports tensorrt until an engine is asked for: :func:`tensorrt_missing` says in one line
what this machine lacks."""

from __future__ import annotations

import logging

import numpy as np
import torch

from common.errors import UserError
from common.serving.metadata import ModelMetadata

log = logging.getLogger("convnets")

CALIBRATION_CACHE = "calibration.cache"


def tensorrt_missing(int8: bool = False) -> str | None:
    """What an engine build needs and this machine lacks (None: nothing)."""
    try:
        import tensorrt as trt
    except ImportError:
        return "the `tensorrt` Python package (pip install tensorrt), which is not installed"
    if not torch.cuda.is_available():
        return "a CUDA GPU, and none is visible"
    if int8 and not hasattr(trt, "IInt8EntropyCalibrator2"):
        return f"TensorRT's INT8 calibrators, which TensorRT {trt.__version__} no longer has"
    return None


def _entropy_calibrator(batches, meta: ModelMetadata, batch_size: int, cache: bytes | None):
    """TensorRT's entropy calibrator over ``batches`` (float32 NCHW arrays of ``batch_size`` images). The cache
    TensorRT writes at the end is kept on ``.cache`` for the caller to store beside the engine; given a cache,
    TensorRT reads the ranges from it and asks for no batch."""
    import tensorrt as trt

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches, self.cache, self.device = iter(batches), cache, None

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            for batch in self.batches:
                # The calibration profile fixes the batch: a last, smaller batch is left out.
                if len(batch) == batch_size:
                    self.device = torch.from_numpy(batch).cuda().contiguous()  # held until the next call
                    return [int(self.device.data_ptr())]
            return None

        def read_calibration_cache(self):
            return self.cache

        def write_calibration_cache(self, cache) -> None:
            self.cache = bytes(cache)

    return Calibrator()


def build_engine(onnx_data: bytes, meta: ModelMetadata, max_batch_size: int, int8_batches=None,
                 calibration_batch: int = 32, cache: bytes | None = None) -> tuple[bytes, bytes | None]:  # fmt: skip
    """An engine with one optimisation profile over batch sizes 1 .. max_batch_size: fp16, or with
    ``int8_batches`` INT8 (fp16 where a layer has no INT8 kernel); returns it and the calibration cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode from TensorRT 10 on; older versions need the flag.
    flags = (
        0 if int(trt.__version__.split(".")[0]) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    )
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse the ONNX export: {errors}")
    config = builder.create_builder_config()
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        log.info("this GPU has no fast fp16: the TensorRT engine's non-INT8 layers stay fp32")
    s = meta.image_size
    profile = builder.create_optimization_profile()
    opt = max(1, max_batch_size // 2)
    profile.set_shape(meta.input_name, (1, 3, s, s), (opt, 3, s, s), (max_batch_size, 3, s, s))
    config.add_optimization_profile(profile)
    calibrator = None
    if int8_batches is not None:
        if not builder.platform_has_fast_int8:
            raise UserError("TensorRT INT8 export needs a GPU with fast INT8, and this one has none")
        config.set_flag(trt.BuilderFlag.INT8)
        # With a dynamic batch axis TensorRT calibrates at one fixed shape: its own profile.
        fixed = (calibration_batch, 3, s, s)
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(meta.input_name, fixed, fixed, fixed)
        config.set_calibration_profile(calibration_profile)
        calibrator = _entropy_calibrator(int8_batches, meta, calibration_batch, cache)
        config.int8_calibrator = calibrator
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UserError("TensorRT could not build an engine from the ONNX export (see its log above)")
    return bytes(engine), calibrator.cache if calibrator else None


class TensorrtRunner:
    """A deserialized engine run on torch's CUDA tensors: a normalised batch (numpy or torch) -> probabilities
    (numpy). Batches up to the engine's profile maximum."""

    def __init__(self, engine_data: bytes, meta: ModelMetadata):
        import tensorrt as trt

        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_data)
        if self.engine is None:
            raise UserError("TensorRT could not deserialize the engine (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.meta = meta

    def __call__(self, batch) -> np.ndarray:
        inputs = torch.as_tensor(np.asarray(batch, dtype=np.float32)).cuda().contiguous()
        outputs = torch.empty(len(inputs), len(self.meta.classes), device="cuda", dtype=torch.float32)
        self.context.set_input_shape(self.meta.input_name, tuple(inputs.shape))
        self.context.set_tensor_address(self.meta.input_name, inputs.data_ptr())
        self.context.set_tensor_address(self.meta.output_name, outputs.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise UserError("TensorRT could not run the engine")
        stream.synchronize()
        return outputs.cpu().numpy()
