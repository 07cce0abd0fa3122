"""What the server runs: a model (PyTorch or ONNX Runtime) that maps a normalised batch to probabilities, and the
decoding of image bytes exactly as ``convnets evaluate`` does. The metadata beside every export is
:mod:`common.serving.metadata`'s; a checkpoint becomes a servable graph in :mod:`common.serving.export`."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.errors import UserError
from common.images import open_rgb, resize_center_crop
from common.serving.metadata import ModelMetadata

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, never at the top: `serve --runtime onnxruntime --model-dir DIR` runs without it
# (the slim serving image, tests/test_serve_onnx.py).
log = logging.getLogger("convnets")


class TorchRuntime:
    def __init__(self, model: torch.nn.Module, meta: ModelMetadata, device: torch.device, threads: int | None = None):
        import torch

        if threads is not None and device.type == "cpu":
            # One process-wide setting; the model thread is the only one computing with torch here.
            torch.set_num_threads(threads)
        self.model, self.meta, self.device = model, meta, device
        self.memory_format = torch.channels_last if meta.channels_last else torch.contiguous_format
        self.name = "torch"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            return self.model(x).float().cpu().numpy()


class OnnxRuntime:
    def __init__(self, model: bytes | str, meta: ModelMetadata, threads: int | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model, options, providers=providers)
        self.meta, self.name = meta, "onnxruntime"
        log.info("onnxruntime providers: %s", ", ".join(self.session.get_providers()))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.meta.output_name], {self.meta.input_name: batch})[0]


def load_runtime(checkpoint: str | None, model_dir: str | None, runtime: str, device: str = "auto",
                 threads: int | None = None):  # fmt: skip
    """A callable float32 NCHW batch -> probabilities, with ``.meta`` and ``.name``; ``threads``: the CPU threads
    of one forward pass (None: the library's default)."""
    if model_dir:
        meta = ModelMetadata.read(Path(model_dir))
        path = Path(model_dir) / (meta.model_file or "")
        if meta.format == "onnx":
            return OnnxRuntime(str(path), meta, threads)
        import torch

        from common.distributed import resolve_device

        if meta.format == "torchscript":
            dev = resolve_device(device)
            return TorchRuntime(torch.jit.load(str(path), map_location=dev).eval(), meta, dev, threads)
        raise UserError(f"serve --model-dir takes an onnx or torchscript export; {model_dir} holds {meta.format}")
    from common.distributed import resolve_device
    from common.serving.export import load_checkpoint_model, onnx_bytes  # a checkpoint: exported in memory

    dev = resolve_device(device if runtime == "torch" else "cpu")
    model, meta = load_checkpoint_model(checkpoint, dev)
    if runtime == "torch":
        return TorchRuntime(model, meta, dev, threads)
    log.info("exporting %s to ONNX for onnxruntime", checkpoint)
    return OnnxRuntime(onnx_bytes(model, meta), meta, threads)


class ImageDecoder:
    """Encoded image bytes -> normalised float32 CHW, with the steps of ``evaluate``: ``open_rgb`` (EXIF orientation,
    every PIL mode to RGB), resize and center crop, then the mean and std of the export.

    ``torch_resize``: resize with ``evaluate``'s own ``eval_transform`` (torchvision), for the torch runtime, so that
    its answers are exactly ``predict``'s. Without it (ONNX Runtime, which runs where torch is not installed) PIL
    resizes: the same sizes, pixels within 2 levels of torchvision's on under 1% of them."""

    def __init__(self, meta: ModelMetadata, max_pixels: int, torch_resize: bool = True):
        self.transform = None
        if torch_resize:
            from common.data import PipelineSpec, eval_transform

            self.transform = eval_transform(PipelineSpec(image_size=meta.image_size, resize_size=meta.resize_size))
        # float32 as the training Normalizer computes them, so that both paths normalise identically.
        self.mean = np.array(meta.mean, np.float32).reshape(3, 1, 1) * np.float32(255)
        self.std = np.array(meta.std, np.float32).reshape(3, 1, 1) * np.float32(255)
        self.max_pixels, self.resize_size, self.image_size = max_pixels, meta.resize_size, meta.image_size

    def _pixels(self, image) -> np.ndarray:
        """uint8 CHW of the resized, center-cropped RGB image."""
        if self.transform is None:
            return resize_center_crop(image, self.resize_size, self.image_size).transpose(2, 0, 1)
        from torchvision.transforms.v2 import functional as F

        return self.transform(F.pil_to_tensor(image)).numpy()

    def __call__(self, data: bytes) -> np.ndarray:
        """Raises ValueError with a message for the client when ``data`` is no usable image."""
        from PIL import Image, UnidentifiedImageError

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
            image = open_rgb(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: tell the client, keep serving
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise ValueError(f"cannot decode the image: {reason}") from None
        return (self._pixels(image).astype(np.float32) - self.mean) / self.std
