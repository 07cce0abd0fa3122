"""Image folders as users bring them: phone photos, 16-bit scans, files only one decoder reads, links, hidden
files, output folders that already hold a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import ImageList, PipelineSpec, build_loader, check_image, dali_decode, find_bad_images, scan_split
from common.errors import UserError
from tests.conftest import FAST_TRAIN, ROOT, make_tree, run_cli

CPU = torch.device("cpu")


def int32_tiff(path: Path) -> Path:
    """A 32-bit integer TIFF: PIL reads it, DALI's decoders do not."""
    Image.fromarray(np.full((40, 40), 30000, dtype=np.int32)).save(path)
    return path


def test_exif_rotation_and_high_bit_depth_decode_alike_on_both_backends(tmp_path):
    """DALI applies the EXIF orientation and scales 16-bit and float images to 8 bits; the pytorch backend
    (PIL) must do the same, or a model trained on one backend is evaluated on other pixels."""
    left_bright = np.zeros((24, 40), dtype=np.uint8)
    left_bright[:, :20] = 230
    files = []
    photo = Image.fromarray(np.stack([left_bright] * 3, axis=-1)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": what a phone held upright writes
    photo.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    files.append(tmp_path / "phone.jpg")
    ramp = np.linspace(0, 1, 40 * 40).reshape(40, 40)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "scan16.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "float.tif")
    files += [tmp_path / "scan16.png", tmp_path / "float.tif"]

    images = ImageList(tmp_path, [str(f) for f in files], [0] * len(files), ["a"])
    spec = PipelineSpec(image_size=24, resize_size=24, batch_size=1, workers=1)
    for f, (xd, _), (xt, _) in zip(files, build_loader("dali-cpu", images, spec, False, CPU),
                                   build_loader("pytorch", images, spec, False, CPU), strict=True):  # fmt: skip
        assert (xd - xt).abs().mean() < 0.1, f.name
        assert xt.std() > 0.5, f.name  # not a constant (all-white or all-black) image
    # Viewed upright, as the tag asks, the photo is bright on its left; its stored pixels are bright at the bottom.
    x, _ = next(iter(build_loader("pytorch", images, spec, False, CPU)))
    assert x[0, :, :, :8].mean() > x[0, :, :, -8:].mean() + 1


def test_a_file_only_pil_reads_is_caught_for_the_dali_backends(fresh_tree, tmp_path, cli):
    bad = int32_tiff(fresh_tree / "train" / "red" / "scan.tif")
    assert check_image(str(bad)) is None  # PIL decodes it...
    assert str(bad) in find_bad_images([str(bad)], dali=True)  # ...DALI does not

    args = ["train", "--data", str(fresh_tree), "--data-backend", "dali-cpu", "--epochs", "1", *FAST_TRAIN]
    proc = run_cli(*args, "--output", str(tmp_path / "a"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "DALI cannot decode" in proc.stderr
    # With only the header check, the failure comes from inside DALI mid-epoch; it still names the file. (The
    # first run cached the file's verdict, which a header check would report at start-up: forget it.)
    (fresh_tree / ".convnets-check-cache.json.gz").unlink()
    proc = run_cli(*args, "--image-check", "header", "--output", str(tmp_path / "b"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "DALI cannot decode 1 file(s)" in proc.stderr
    # The runs that train do one step: the start-up check is what is tested.
    proc = run_cli(*args, "--skip-bad-images", "--max-steps-per-epoch", "1", "--output", str(tmp_path / "c"))
    assert "leaving out 1 file(s)" in proc.stdout and str(bad) in proc.stdout
    # The pytorch backend reads it, and `prepare --check` lists it for DALI's sake.
    run_cli(*args[:4], "pytorch", *args[5:], "--max-steps-per-epoch", "1", "--output", str(tmp_path / "d"))
    check = cli("prepare", "--check", str(fresh_tree), check=False)
    assert check.returncode == 1 and str(bad) in check.stdout


def crashing_probe(tmp_path: Path, crashes: int) -> Path:
    """A stand-in for DALI's probe script that dies of SIGSEGV ``crashes`` times after one batch's answer (as DALI
    did now and then, tearing down a failed pipeline), then runs the real probe."""
    tmp_path.mkdir()
    count = tmp_path / "crashes"
    script = tmp_path / "probe.py"
    script.write_text(f"""import json, os, runpy, signal, sys
count = {str(count)!r}
n = int(open(count).read()) if os.path.exists(count) else 0
if n < {crashes}:
    open(count, "w").write(str(n + 1))
    job = json.load(sys.stdin)
    if n == 0:  # the first child gets through one batch before it dies; the next ones die at once
        print(json.dumps({{"done": job["batch_size"], "bad": {{}}}}), flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)
runpy.run_path({str(dali_decode.PROBE_SCRIPT)!r}, run_name="__main__")
""")
    return script


def test_a_crash_of_dalis_decoder_costs_a_child_process_not_the_check(fresh_tree, tmp_path, monkeypatch):
    bad = int32_tiff(fresh_tree / "train" / "red" / "scan.tif")
    files = sorted(str(f) for f in fresh_tree.rglob("*.*"))
    assert len(files) > 8
    progress = []
    monkeypatch.setattr(dali_decode, "PROBE_SCRIPT", crashing_probe(tmp_path / "twice", 2))
    found = dali_decode.dali_undecodable(files, batch_size=8, progress=progress.append)
    assert found.keys() == {str(bad)}
    assert progress[0] == 8 and progress[-1] == len(files)  # the restarted child went on from the second batch
    assert (tmp_path / "twice" / "crashes").read_text() == "2"

    monkeypatch.setattr(dali_decode, "PROBE_SCRIPT", crashing_probe(tmp_path / "always", 100))
    with pytest.raises(UserError, match=f"crashed {dali_decode.CRASH_TRIES} times .* on the 8 files from "):
        dali_decode.dali_undecodable(files, batch_size=8)


def test_the_pytorch_backend_names_a_file_it_cannot_decode(fresh_tree, tmp_path):
    good = fresh_tree / "train" / "blue" / "000.png"
    broken = fresh_tree / "train" / "blue" / "cut.png"
    broken.write_bytes(good.read_bytes()[:60])
    proc = run_cli("train", "--data", str(fresh_tree), "--data-backend", "pytorch", "--image-check", "none",
                   "--epochs", "1", "--output", str(tmp_path), *FAST_TRAIN, check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot decode {broken}" in proc.stderr


def test_an_image_too_large_for_pil_is_reported_not_raised(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this
    assert "too large" in check_image(str(path))


def test_scan_follows_links_skips_hidden_files_and_tolerates_empty_val_classes(tmp_path, caplog):
    root = make_tree(tmp_path / "data", train_per_class=2, val_per_class=2, mixed_modes=False)
    shutil.copytree(root / "train" / "red", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", root / "train" / "red" / "phone")  # a linked folder inside a class
    os.symlink(root / "train" / "red", root / "train" / "red" / "phone" / "loop")  # and a loop back up
    (root / "train" / "red" / "._000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "train" / "red" / ".thumbnails").mkdir()
    shutil.copy(root / "train" / "blue" / "000.png", root / "train" / "red" / ".thumbnails" / "t.png")
    (root / "train" / "red" / "notes.txt").write_text("not an image")

    with caplog.at_level("INFO"):
        train = scan_split(root / "train")
    red = [Path(f) for f, y in zip(train.files, train.labels, strict=True) if train.classes[y] == "red"]
    assert sorted(p.relative_to(root / "train" / "red").as_posix() for p in red) == [
        "000.png", "001.png", "phone/000.png", "phone/001.png"]  # fmt: skip
    assert "left out 1 file(s) that are not images" in caplog.text

    for f in (root / "val" / "green").iterdir():
        f.unlink()
    val = scan_split(root / "val", classes=train.classes)  # an empty val class is not an error
    assert len(val) == 6 and "green" not in {val.classes[y] for y in val.labels}


def test_a_fresh_run_does_not_overwrite_an_earlier_one(fresh_tree, tmp_path):
    args = ["train", "--data", str(fresh_tree), "--data-backend", "pytorch", "--epochs", "1", "--output",
            str(tmp_path), *FAST_TRAIN, "--max-steps-per-epoch", "1"]  # fmt: skip
    run_cli(*args)
    before = (tmp_path / "best.pt").read_bytes()
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and "holds the checkpoints of an earlier run" in proc.stderr
    assert "--resume auto" in proc.stderr and (tmp_path / "best.pt").read_bytes() == before
    proc = run_cli(*args, "--resume", "auto")  # a finished run: nothing to train, nothing lost
    assert "already has its 1 epochs" in proc.stdout and (tmp_path / "best.pt").read_bytes() == before
    # best.pt alone (its epoch checkpoints moved away): --resume auto cannot continue it and must not replace it.
    (tmp_path / "checkpoint_epoch_0000.pt").unlink()
    proc = run_cli(*args, "--resume", "auto", check=False)
    assert proc.returncode == 2 and "holds an earlier run's best.pt" in proc.stderr
    assert (tmp_path / "best.pt").read_bytes() == before


def test_machine_readable_stdout_stays_clean(fresh_tree, tmp_path):
    run_cli("train", "--data", str(fresh_tree), "--data-backend", "pytorch", "--epochs", "1", "--output",
            str(tmp_path / "run"), *FAST_TRAIN, "--max-steps-per-epoch", "1")  # fmt: skip
    (fresh_tree / "val" / "red" / "bad.png").write_bytes(b"")
    proc = run_cli("evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(fresh_tree),
                   "--skip-bad-images", "--json", "--output", str(tmp_path / "eval"))  # fmt: skip
    assert json.loads(proc.stdout)["images"] == 32 and "leaving out 1 file(s)" in proc.stderr
    # A reader that stops at once (`| true`) closes the pipe: no traceback, no logging error.
    proc = subprocess.run(
        f"{sys.executable} -m common predict --checkpoint {tmp_path / 'run' / 'best.pt'} {fresh_tree / 'val'} | true",
        shell=True, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr
