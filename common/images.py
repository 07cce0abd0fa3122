"""Image files to RGB with PIL and numpy only (no torch): shared by the PyTorch loaders and by the ONNX Runtime
server, which runs where torch is not installed (the slim serving image)."""

from __future__ import annotations

import numpy as np


def open_rgb(path):
    """Decode any PIL-readable image (grayscale, palette, RGBA, CMYK, 16-bit, ...) to an RGB PIL image, as DALI's
    decoders do: the EXIF orientation applied, 16-bit values scaled by 255/65535, float images by 255."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("F", "I") or im.mode.startswith("I;16"):
            # PIL's convert("RGB") clips these to 0..255: 16-bit images would turn white, float ones black.
            scale = 255.0 if im.mode == "F" else 255.0 / 65535.0
            grey = np.clip(np.asarray(im, dtype=np.float64) * scale, 0, 255).round().astype(np.uint8)
            im = Image.fromarray(grey)
        return im.convert("RGB")


def resize_center_crop(image, resize_size: int, crop_size: int) -> np.ndarray:
    """uint8 HWC: the shorter side resized to ``resize_size`` (PIL's antialiased bilinear), then the central
    ``crop_size`` square. The sizes are torchvision's ``Resize(resize_size)`` + ``CenterCrop(crop_size)``; the
    pixels differ from its tensor resize by at most 2 levels on under 1% of them (tests/test_serve_onnx.py)."""
    from PIL import Image

    width, height = image.size
    if width <= height:
        size = (resize_size, int(resize_size * height / width))
    else:
        size = (int(resize_size * width / height), resize_size)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - crop_size) / 2.0)), int(round((size[1] - crop_size) / 2.0))
    # PIL pads a box reaching outside the image with zeros, as torchvision's CenterCrop does.
    return np.asarray(image.crop((left, top, left + crop_size, top + crop_size)))
