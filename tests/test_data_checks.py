"""Start-up checks that scale: verdicts and sizes cached by (path, size, mtime), shared by training and
`convnets prepare --check`, so a second check decodes only new or changed files."""

from __future__ import annotations

import importlib.util
import logging
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from common import prepare
from common.data import checks, drop_bad_images, find_bad_images
from common.errors import UserError
from common.prepare import check_tree
from tests.conftest import ROOT, scan_splits


def small_tree(root, n: int = 6):
    from PIL import Image

    for split in ("train", "val"):
        folder = root / split / "a"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((10 + i, 20, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return root


def test_a_second_check_decodes_only_new_or_changed_files(tmp_path, check_decodes):
    root = small_tree(tmp_path)
    train, val = drop_bad_images(scan_splits(root), "full", skip_bad=False, workers=1)
    assert check_decodes == {"header": 0, "full": 12, "dali": 0}
    assert train.sizes.tolist() == [[20, 10 + i] for i in range(6)]
    assert (root / checks.CACHE_NAME).is_file()

    again = drop_bad_images(scan_splits(root), "full", skip_bad=False, workers=1)  # a resume, a second run
    assert check_decodes["full"] == 12 and np.array_equal(again[0].sizes, train.sizes)

    changed = root / "train" / "a" / "3.png"
    changed.write_bytes(b"not an image any more")
    os.utime(changed, ns=(1, 1))
    with pytest.raises(UserError, match="3.png: not an image"):
        drop_bad_images(scan_splits(root), "full", skip_bad=False, workers=1)
    assert check_decodes["full"] == 13
    # A known-bad file stays bad without a decode, whatever the check's depth.
    with pytest.raises(UserError, match="3.png"):
        drop_bad_images(scan_splits(root), "header", skip_bad=False, workers=1)
    assert check_decodes["full"] == 13 and check_decodes["header"] == 0


def test_training_and_prepare_check_share_the_cache(tmp_path, check_decodes):
    root = small_tree(tmp_path)
    assert check_tree(root, workers=1) == {}
    assert check_decodes == {"header": 0, "full": 12, "dali": 12}
    drop_bad_images(scan_splits(root), "full", skip_bad=False, workers=1, dali=True)  # a DALI training run
    drop_bad_images(scan_splits(root), "full", skip_bad=False, workers=1, dali=False)  # a pytorch one
    assert check_decodes == {"header": 0, "full": 12, "dali": 12}
    # evaluate --data DATA checks DATA/val alone: still the root's cache, no decode.
    drop_bad_images(scan_splits(root)[1:], "full", skip_bad=False, workers=1, dali=True)
    assert check_decodes == {"header": 0, "full": 12, "dali": 12}


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships them: two zero bytes, the type (8: uint8), the rank, the big-endian
    dimensions, then the values."""
    path.write_bytes(b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.tobytes())  # fmt: skip


def test_training_check_after_prepare_fashion_mnist_decodes_nothing(tmp_path, check_decodes, caplog):
    rng = np.random.default_rng(0)
    source = tmp_path / "idx"
    source.mkdir()
    for split, n in (("train", 12), ("val", 5)):  # a small stand-in for the 60,000 + 10,000 images
        image_file, label_file = prepare.FASHION_MNIST_FILES[split]
        write_idx(source / image_file, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(source / label_file, (np.arange(n) % 10).astype(np.uint8))
    out = tmp_path / "fashion-mnist"
    assert prepare.prepare_fashion_mnist(out, source, workers=1) == {"train": 12, "val": 5}
    assert (out / checks.CACHE_NAME).is_file()

    for dali in (True, False):  # a DALI training run's check, then a pytorch one's
        with caplog.at_level(logging.INFO, logger="common.data.checks"):
            train, val = drop_bad_images(scan_splits(out), "auto", skip_bad=False, workers=1, dali=dali)
        assert "image check: full (all 17 files have a cached verdict)" in caplog.text
        assert check_decodes == {"header": 0, "full": 0, "dali": 0}
        assert len(train) == 12 and len(val) == 5 and train.sizes.tolist() == [[28, 28]] * 12
    # The verdicts recorded without a decode are the ones a decode gives.
    files = train.files + val.files
    assert find_bad_images(files, full=True, dali=importlib.util.find_spec("nvidia.dali") is not None) == {}


def test_prepare_check_needs_no_torch(tmp_path):
    """``convnets prepare --check DIR`` reads images and the cache only: torch, most of a command's start-up, is
    made unimportable here, and both the first check (decodes) and the next (cached verdicts) still succeed."""
    root = small_tree(tmp_path)
    without_torch = "import runpy, sys; sys.modules['torch'] = None; runpy.run_module('common', run_name='__main__')"
    for run in ("first", "cached"):
        proc = subprocess.run([sys.executable, "-c", without_torch, "prepare", "--check", str(root)],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
        assert proc.returncode == 0, f"{run} check:\n{proc.stdout}\n{proc.stderr}"
        assert "checked 12 image files" in proc.stdout + proc.stderr
    assert "verdicts cached" not in proc.stdout  # the second check found every verdict in the cache


def test_a_header_check_is_cached_then_deepened(tmp_path, check_decodes):
    root = small_tree(tmp_path)
    drop_bad_images(scan_splits(root), "header", skip_bad=False, workers=1)
    drop_bad_images(scan_splits(root), "full", skip_bad=False, workers=1, dali=True)
    assert check_decodes == {"header": 12, "full": 0, "dali": 12}


def test_the_cache_goes_to_the_user_cache_dir_when_the_data_folder_is_read_only(tmp_path, monkeypatch):
    root = small_tree(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    import tempfile

    mkstemp = tempfile.mkstemp

    def read_only_data(*args, dir=None, **kwargs):
        if os.path.realpath(dir) == os.path.realpath(root):
            raise PermissionError(13, "Read-only file system", str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_data)
    drop_bad_images(scan_splits(root), "header", skip_bad=False, workers=1)
    assert not (root / checks.CACHE_NAME).exists()
    (saved,) = list((tmp_path / "cache" / "convnets").glob("check-cache-*.json.gz"))
    assert len(checks.CheckCache(root).entries) == 12 and checks.CheckCache(root).loaded_from == saved


def test_auto_decodes_when_cheap_and_says_why(tmp_path, check_decodes, caplog, monkeypatch):
    root = small_tree(tmp_path)
    with caplog.at_level(logging.INFO, logger="common.data.checks"):
        drop_bad_images(scan_splits(root), "auto", skip_bad=False, workers=1)
    assert check_decodes["full"] == 12 and "image check: full (12 of 12 files not yet checked" in caplog.text
    caplog.clear()
    monkeypatch.setattr(checks, "AUTO_FULL_LIMIT", 5)
    (root / "train" / "a" / "new.png").write_bytes((root / "train" / "a" / "0.png").read_bytes())
    for name in ("x", "y", "z", "w", "v", "u"):
        (root / "val" / "a" / f"{name}.png").write_bytes((root / "val" / "a" / "0.png").read_bytes())
    with caplog.at_level(logging.INFO, logger="common.data.checks"):
        drop_bad_images(scan_splits(root), "auto", skip_bad=False, workers=1)
    assert "image check: header (7 of 19 files not yet decoded" in caplog.text
    assert check_decodes["full"] == 12 and check_decodes["header"] == 7
