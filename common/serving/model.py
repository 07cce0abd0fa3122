"""What the server runs: a model (PyTorch or ONNX Runtime) that maps a normalised batch to probabilities, and the
decoding of image bytes exactly as ``convnets evaluate`` does. The metadata beside every export is
:mod:`common.serving.metadata`'s; a checkpoint becomes a servable graph in :mod:`common.serving.export`."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.serving.metadata import ModelMetadata

log = logging.getLogger("convnets")


class TorchRuntime:
    def __init__(self, model: torch.nn.Module, meta: ModelMetadata, device: torch.device):
        self.model, self.meta, self.device = model, meta, device
        self.memory_format = torch.channels_last if meta.channels_last else torch.contiguous_format
        self.name = "torch"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            return self.model(x).float().cpu().numpy()


class OnnxRuntime:
    def __init__(self, model: bytes | str, meta: ModelMetadata):
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(model, providers=providers)
        self.meta, self.name = meta, "onnxruntime"
        log.info("onnxruntime providers: %s", ", ".join(self.session.get_providers()))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.meta.output_name], {self.meta.input_name: batch})[0]


def load_runtime(checkpoint: str | None, model_dir: str | None, runtime: str, device: str = "auto"):
    """A callable float32 NCHW batch -> probabilities, with ``.meta`` and ``.name``."""
    from common.distributed import resolve_device

    if model_dir:
        meta = ModelMetadata.read(Path(model_dir))
        path = Path(model_dir) / (meta.model_file or "")
        if meta.format == "onnx":
            return OnnxRuntime(str(path), meta)
        if meta.format == "torchscript":
            dev = resolve_device(device)
            return TorchRuntime(torch.jit.load(str(path), map_location=dev).eval(), meta, dev)
        raise UserError(f"serve --model-dir takes an onnx or torchscript export; {model_dir} holds {meta.format}")
    from common.serving.export import load_checkpoint_model, onnx_bytes  # a checkpoint: exported in memory

    dev = resolve_device(device if runtime == "torch" else "cpu")
    model, meta = load_checkpoint_model(checkpoint, dev)
    if runtime == "torch":
        return TorchRuntime(model, meta, dev)
    log.info("exporting %s to ONNX for onnxruntime", checkpoint)
    return OnnxRuntime(onnx_bytes(model, meta), meta)


class ImageDecoder:
    """Encoded image bytes -> normalised float32 CHW, with the exact steps of ``evaluate``: ``load_rgb`` (EXIF
    orientation, every PIL mode to RGB), ``eval_transform`` (resize, center crop), then ``Normalizer``."""

    def __init__(self, meta: ModelMetadata, max_pixels: int):
        from common.data import Normalizer, PipelineSpec, eval_transform

        self.transform = eval_transform(PipelineSpec(image_size=meta.image_size, resize_size=meta.resize_size))
        self.normalize = Normalizer(torch.device("cpu"), channels_last=False)
        self.normalize.mean = torch.tensor(meta.mean).view(1, 3, 1, 1) * 255
        self.normalize.std = torch.tensor(meta.std).view(1, 3, 1, 1) * 255
        self.max_pixels, self.resize_size = max_pixels, meta.resize_size

    def __call__(self, data: bytes) -> np.ndarray:
        """Raises ValueError with a message for the client when ``data`` is no usable image."""
        from PIL import Image, UnidentifiedImageError

        from common.data import load_rgb

        try:
            # Image.open reads only the header: refuse a decompression bomb before any pixel is decoded.
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        except Image.DecompressionBombError as e:
            raise ValueError(f"refused as a decompression bomb: {e}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"the bytes are not an image PIL can read ({str(e)[:120]})") from None
        if min(width, height) < 1:
            raise ValueError(f"image of {width}x{height} has no pixels")
        if width * height > self.max_pixels:
            raise ValueError(f"image claims {width}x{height} pixels, more than --max-image-pixels {self.max_pixels}: "
                             "refused as a possible decompression bomb")  # fmt: skip
        # A thin strip is small, but resizing its shorter side up to the eval size would make it enormous.
        resized = self.resize_size**2 * max(width, height) / min(width, height)
        if resized > self.max_pixels:
            raise ValueError(
                f"image of {width}x{height} would have {resized:.3g} pixels once its shorter side "
                f"is resized to {self.resize_size}: over --max-image-pixels {self.max_pixels}"
            )
        try:
            image = load_rgb(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: tell the client, keep serving
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise ValueError(f"cannot decode the image: {reason}") from None
        return self.normalize(self.transform(image)[None])[0].numpy()
