"""The CUDA paths: run where a GPU is (`pytest tests/test_gpu.py`); skipped on CPU-only machines such as CI.

They hold the GPU half to the same contracts the CPU tests hold the CPU half to: dali-gpu yields what dali-cpu
yields, fp16 AMP trains, evaluation works on device tensors, DDP over NCCL matches one process, and the
benchmark reports the GPU's telemetry.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from common.data import PipelineSpec, build_loader, scan_split
from common.logger import read_log
from tests.conftest import FAST_TRAIN, ROOT, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")
CUDA = torch.device("cuda", 0)


def final(out):
    return [r["data"] for r in read_log(out / "log.json") if r["step"] == [] and "val.top1" in r["data"]][-1]


@needs_dali
@pytest.mark.parametrize("train", [False, True])
def test_dali_gpu_yields_what_dali_cpu_yields(image_tree, train):
    images = scan_split(image_tree / ("train" if train else "val"))
    spec = PipelineSpec(image_size=32, resize_size=36, batch_size=16, workers=2, seed=1)
    gpu = list(build_loader("dali-gpu", images, spec, train=train, device=CUDA))
    cpu = list(build_loader("dali-cpu", images, spec, train=train, device=torch.device("cpu")))
    assert len(gpu) == len(cpu)
    for (xg, yg), (xc, yc) in zip(gpu, cpu, strict=True):
        assert xg.is_cuda and yg.is_cuda and xg.shape == xc.shape
        assert torch.equal(yg.cpu(), yc)
        # Same files, same crop windows and flips; nvJPEG and libjpeg-turbo differ by rounding only.
        assert (xg.cpu() - xc).abs().mean() < 0.05


@pytest.mark.parametrize(
    "backend", [pytest.param("dali-gpu", marks=needs_dali), "pytorch", "synthetic"]
)  # fmt: skip
def test_fp16_amp_training_on_the_gpu(image_tree, tmp_path, backend):
    proc = run_cli("train", "--data", str(image_tree), "--data-backend", backend, "--epochs", "3", "--amp",
                   "--memory-format", "channels_last", "--output", str(tmp_path), *FAST_TRAIN)  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["device"].startswith("cuda") and config["amp"] is True
    metrics = final(tmp_path)
    if backend != "synthetic":
        assert metrics["val.top1"] > 50, proc.stdout  # 4 classes: chance is 25%
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the GradScaler's state is checkpointed


def test_amp_is_on_by_default_on_the_gpu_and_resume_works(image_tree, tmp_path):
    args = ["train", "--data", str(image_tree), "--data-backend", "pytorch", "--output", str(tmp_path),
            *FAST_TRAIN, "--max-steps-per-epoch", "3"]  # fmt: skip
    run_cli(*args, "--epochs", "1")
    assert json.loads((tmp_path / "config.json").read_text())["amp"] is True
    proc = run_cli(*args, "--epochs", "2", "--resume", "auto")
    assert "resumed from" in proc.stdout and (tmp_path / "checkpoint_epoch_0001.pt").exists()


def test_evaluate_and_predict_on_the_gpu(image_tree, tmp_path):
    run_cli("train", "--data", str(image_tree), "--data-backend", "pytorch", "--epochs", "1", "--output",
            str(tmp_path / "run"), *FAST_TRAIN, "--max-steps-per-epoch", "4")  # fmt: skip
    proc = run_cli("evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(image_tree),
                   "--data-backend", "pytorch", "--json", "--output", str(tmp_path / "eval"))  # fmt: skip
    assert json.loads(proc.stdout)["images"] == 64
    proc = run_cli("predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), str(image_tree / "val" / "red"))
    assert len(proc.stdout.splitlines()) == 16


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_ddp_matches_one_process(image_tree, tmp_path):
    common = ["--data", str(image_tree), "--data-backend", "pytorch", "--epochs", "2", "--deterministic",
              "--no-amp", "--no-tf32", "--optimizer-batch-size", "32", *FAST_TRAIN, "--lr", "0.05"]  # fmt: skip
    run_cli("train", *common, "--output", str(tmp_path / "one"))
    proc = subprocess.run(
        ["bash", str(ROOT / "common" / "launch.sh"), "2", "train", *common, "--output", str(tmp_path / "two")],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert final(tmp_path / "two")["val.loss"] == pytest.approx(final(tmp_path / "one")["val.loss"], rel=1e-3)


def test_gpu_affinity_pins_or_warns(image_tree, tmp_path):
    proc = run_cli("train", "--data", str(image_tree), "--data-backend", "synthetic", "--epochs", "1",
                   "--gpu-affinity", "--output", str(tmp_path), *FAST_TRAIN, "--max-steps-per-epoch", "2")  # fmt: skip
    assert "CPU affinity set to" in proc.stdout or "could not set CPU affinity" in proc.stdout + proc.stderr


def test_benchmark_reports_gpu_telemetry(tmp_path):
    out = tmp_path / "bench.json"
    run_cli("benchmark", "--mode", "inference", "--arch", "resnet18", "--batch-size", "64", "--amp",
            "--iterations", "30", "--warmup", "5", "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["device"] == torch.cuda.get_device_name(0)
    assert result["throughput_img_s"] > 0 and result["peak_memory_mb"] > 0
    assert "gpu_memory_used_max_mb" in result.get("gpu", {}), result
