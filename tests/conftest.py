"""Shared fixtures: small generated ImageFolder trees and a helper to run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def make_image(rng: np.random.Generator, color: tuple[int, int, int], size: int = 40) -> np.ndarray:
    """A noisy background with a large square of the class colour at a random place: easy to learn,
    yet not constant, and it survives random crops and flips."""
    image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    side = rng.integers(size // 2, size - 4)
    y, x = rng.integers(0, size - side, 2)
    image[y : y + side, x : x + side] = np.clip(np.array(color) + rng.integers(-25, 25, 3), 0, 255)
    return image


def write_image(array: np.ndarray, path: Path, mode: str = "RGB") -> None:
    """Save in a given PIL mode (L, P, RGBA, CMYK as JPEG) to exercise the conversion to RGB."""
    image = Image.fromarray(array)
    if mode == "L":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "RGBA":
        image = image.convert("RGBA")
    elif mode == "CMYK":
        image = image.convert("CMYK")
    image.save(path)


def make_tree(root: Path, train_per_class: int = 48, val_per_class: int = 16, seed: int = 0, mixed_modes=True) -> Path:
    """``root/{train,val}/<color>/*`` with PNG and JPEG files; some grayscale, palette, RGBA and CMYK."""
    rng = np.random.default_rng(seed)
    modes = [("RGB", "png"), ("RGB", "jpg"), ("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg")]
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                mode, ext = modes[i % len(modes)] if mixed_modes else ("RGB", "png")
                if mode == "L":  # grey images of a colour class carry only brightness: keep them rare
                    mode, ext = ("L", "png") if i % 12 == 2 else ("RGB", "png")
                write_image(make_image(rng, color), folder / f"{i:03d}.{ext}", mode)
    return root


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """A 4-class tree (192 train, 64 val images) shared read-only by the tests."""
    return make_tree(tmp_path_factory.mktemp("colors"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's in-process inference: on a shared 2-core machine a second thread spins
    and makes each small batch about ten times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_tree(tmp_path) -> Path:
    """A private copy a test may damage (bad files, empty folders)."""
    return make_tree(tmp_path / "data", train_per_class=16, val_per_class=8, mixed_modes=False)


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m common ARGS`` in a subprocess, as a user's shell would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "common", *args], capture_output=True, text=True, env=full_env, cwd=ROOT,
        timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"convnets {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# Small, fast training settings every end-to-end test starts from.
FAST_TRAIN = [
    "--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "2", "--lr", "0.2",
    "--warmup-epochs", "0.5", "--weight-decay", "5e-5", "--min-crop-scale", "0.5", "--print-freq", "1",
    "--label-smoothing", "0.0",
]  # fmt: skip
