"""Folders a command may not write (a read-only mount, another user's folder in a container): the command stops at
once with one line naming the folder, who it runs as and what to do, before its work, instead of a traceback after
it; and the temporary files of checkpoint saves killed mid-way do not pile up in the run folder.

The read-only folders are real: a bind mount made read-only in a private mount namespace (``unshare -m``), which
denies root as well (the tests run as root on CI, where permission bits would not)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ONE_THREAD, ROOT, make_tree
from test_serve import write_tiny_checkpoint

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="a read-only bind mount needs root and unshare"
)


def run_read_only(folder, *args: str) -> subprocess.CompletedProcess:
    """``convnets ARGS`` with ``folder`` mounted read-only over itself, for this process alone."""
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, str(folder), sys.executable, "-m", "common", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert "runs as uid 0, gid 0" in lines[0] and "CONVNETS_USER" in lines[0]
    return lines[0]


def test_benchmark_refuses_a_result_folder_it_cannot_write_before_measuring(tmp_path):
    ro = tmp_path / "results"
    ro.mkdir()
    proc = run_read_only(ro, "benchmark", "--mode", "inference", "--arch", "resnet18", "--image-size", "32",
                         "--batch-size", "2", "--iterations", "2", "--warmup", "1", "--device", "cpu",
                         "--json", str(ro / "cpu" / "result.json"))  # fmt: skip
    line = one_error_line(proc)
    assert f"cannot write the result to {ro / 'cpu'}: Read-only file system" in line
    assert "img/s" not in proc.stdout + proc.stderr  # nothing was measured
    assert list(ro.iterdir()) == []


def test_training_refuses_a_run_folder_it_cannot_write_before_the_image_check(tmp_path):
    data = make_tree(tmp_path / "data", train_per_class=4, val_per_class=2)
    ro = tmp_path / "runs"
    ro.mkdir()
    proc = run_read_only(ro, "train", "--data", str(data), "--arch", "resnet18", "--image-size", "32", "--epochs",
                         "1", "--batch-size", "4", "--device", "cpu", "--output", str(ro / "r18"))  # fmt: skip
    assert f"cannot write the run to {ro / 'r18'}: Read-only file system" in one_error_line(proc)
    assert "image check" not in proc.stderr + proc.stdout


def test_evaluate_beside_a_read_only_checkpoint_asks_for_output_and_works_with_it(tmp_path):
    data = make_tree(tmp_path / "data", train_per_class=2, val_per_class=3)
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = write_tiny_checkpoint(models / "best.pt")
    proc = run_read_only(models, "evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--device", "cpu")
    line = one_error_line(proc)
    assert f"cannot write the evaluation to {models / 'eval_val'}" in line and "pass --output DIR" in line
    proc = run_read_only(models, "evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--device", "cpu",
                         "--output", str(tmp_path / "eval"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_export_refuses_a_folder_it_cannot_write(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "best.pt")
    ro = tmp_path / "exports"
    ro.mkdir()
    proc = run_read_only(ro, "export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(ro / "onnx"))
    assert f"cannot write the export to {ro / 'onnx'}: Read-only file system" in one_error_line(proc)


def test_any_other_refused_write_is_one_line_naming_the_file(tmp_path):
    # predict --organize has no check of its own: the CLI's handler names the folder it was refused and who runs.
    data = make_tree(tmp_path / "data", train_per_class=1, val_per_class=1)
    checkpoint = write_tiny_checkpoint(tmp_path / "best.pt")
    ro = tmp_path / "sorted"
    ro.mkdir()
    proc = run_read_only(ro, "predict", "--checkpoint", str(checkpoint), "--organize", str(ro / "by-class"),
                         "--device", "cpu", str(data / "val"))  # fmt: skip
    line = one_error_line(proc)
    assert line.startswith("error: Read-only file system: " + str(ro / "by-class")), line
