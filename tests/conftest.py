"""Shared fixtures: small generated ImageFolder trees and a helper to run the CLI as a user would."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def check_decodes(monkeypatch) -> dict:
    """Count the PIL opens (by depth) and DALI decodes the start-up image checks do."""
    from common.data import checks

    calls = {"header": 0, "full": 0, "dali": 0}
    inspect, dali = checks.inspect_image, checks.dali_undecodable

    def inspect_counted(path, full=True):
        calls["full" if full else "header"] += 1
        return inspect(path, full)

    def dali_counted(files, *args, **kwargs):
        calls["dali"] += len(files)
        return dali(files, *args, **kwargs)

    monkeypatch.setattr(checks, "inspect_image", inspect_counted)
    monkeypatch.setattr(checks, "dali_undecodable", dali_counted)
    return calls


def scan_splits(root: Path) -> list:
    """``root/train`` and ``root/val`` listed as training lists them (val against train's classes)."""
    from common.data import scan_split

    train = scan_split(root / "train")
    return [train, scan_split(root / "val", classes=train.classes)]


@pytest.fixture
def fresh_tree(tmp_path) -> Path:
    """A private copy a test may damage (bad files, empty folders)."""
    return make_tree(tmp_path / "data", train_per_class=16, val_per_class=8, mixed_modes=False)


# For the processes the tests start: one intra-op thread. Two OpenMP threads on 2 busy cores spin while waiting
# for each other: a 3-epoch test run took 164 s with them and 30 s with one (load 5, 2 cores); every result a test
# compares is computed under the same setting.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m common ARGS`` in a subprocess, as a user's shell would (with ``ONE_THREAD``)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "common", *args], capture_output=True, text=True, env=full_env, cwd=ROOT,
        timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"convnets {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli(capfd):
    """``cli(*args, check=True)``: ``convnets ARGS`` run in this process, as ``run_cli`` runs it in a subprocess and
    with the same result (exit code, stdout, stderr; captured at the file descriptors, so output from C code
    counts), without the seconds of interpreter and torch start-up. For commands that only read (evaluate,
    predict, info, prepare --check) and for errors; training and anything about processes or signals runs in a
    subprocess. The logging set-up that ``main`` makes is undone afterwards."""
    from common.cli import main

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        root = logging.getLogger()
        saved = root.handlers[:], root.level, logging.getLogRecordFactory(), logging.raiseExceptions
        rngs = torch.get_rng_state(), np.random.get_state(), random.getstate()  # a failing train seeds them
        capfd.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            logging.setLogRecordFactory(saved[2])
            logging.raiseExceptions = saved[3]
            torch.set_rng_state(rngs[0])
            np.random.set_state(rngs[1])
            random.setstate(rngs[2])
        out, err = capfd.readouterr()
        if check and code != 0:
            raise AssertionError(f"convnets {' '.join(args)} failed ({code}):\n{out}\n{err}")
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


# Small, fast training settings every end-to-end test starts from.
FAST_TRAIN = [
    "--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "2", "--lr", "0.2",
    "--warmup-epochs", "0.5", "--weight-decay", "5e-5", "--min-crop-scale", "0.5", "--print-freq", "1",
    "--label-smoothing", "0.0",
]  # fmt: skip


def pytest_collection_modifyitems(items):
    """The container tests last: .ci/run builds their images in the background while the others run."""
    items.sort(key=lambda item: item.get_closest_marker("container") is not None)


@pytest.fixture(scope="session")
def trained_colors(tmp_path_factory) -> tuple[Path, Path]:
    """``(data root, best.pt)``: a ResNet-18 trained in this process on a small colour tree (4 classes, 96 training
    and 48 validation images; about 25 s on 2 cores), for the tests that compare a trained model's top-1 across
    formats and precisions (an untrained one's near-uniform probabilities would make such comparisons noise)."""
    from common import config
    from common.engine import train

    data = make_tree(tmp_path_factory.mktemp("colors_trained"), train_per_class=24, val_per_class=12, mixed_modes=False)
    out = tmp_path_factory.mktemp("colors_run")
    cli = {"data": str(data), "output": str(out), "arch": "resnet18", "image_size": 32, "batch_size": 8,
           "workers": 0, "data_backend": "pytorch", "epochs": 4, "lr": 0.1, "warmup_epochs": 0.0,
           "image_check": "none", "seed": 0}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_torch_thread
    try:
        train(config.resolve(config.TrainConfig, cli))
    finally:
        torch.set_num_threads(threads)
    return data, out / "best.pt"
