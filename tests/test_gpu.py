"""The CUDA paths: run where a GPU is (`pytest tests/test_gpu.py`); skipped on CPU-only machines such as CI.

They hold the GPU half to the same contracts the CPU tests hold the CPU half to: dali-gpu yields what dali-cpu
yields, fp16 AMP trains, evaluation works on device tensors, DDP over NCCL matches one process, and the
benchmark reports the GPU's telemetry. And what only a GPU can show: steady-state training steps and evaluation
never make the host wait for the device, and --compile reduce-overhead (CUDA graphs) trains.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

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
    # The GradScaler's state is checkpointed and is the one it had: from 2**16, halved at each overflow and not
    # yet grown (growth needs 2000 clean steps), with its count of clean steps since the last overflow.
    scale, clean = state["scaler"]["scale"], state["scaler"]["_growth_tracker"]
    assert math.log2(scale).is_integer() and 1 <= scale <= 2**16, scale
    assert 0 <= clean <= state["step"] and (scale == 2**16) == (clean == state["step"]), (scale, clean, state["step"])


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


def test_gpu_affinity_pins_to_the_cores_nvml_names():
    """--gpu-affinity leaves the process on the cores NVML says are nearest its GPU (those this container
    allows); skipped where NVML cannot say, since the option then only warns."""
    from common.telemetry import nvml_handle

    try:
        pynvml, handle = nvml_handle(0)
        words = pynvml.nvmlDeviceGetCpuAffinity(handle, (os.cpu_count() + 63) // 64)
    except Exception as e:  # noqa: BLE001 - no pynvml, no driver support, a container without the capability
        pytest.skip(f"NVML cannot report the GPU's CPU affinity here: {e}")
    nvml_cores = {i * 64 + b for i, word in enumerate(words) for b in range(64) if (word >> b) & 1}
    expected = nvml_cores & os.sched_getaffinity(0)
    if not expected:
        pytest.skip(f"NVML's cores for cuda:0 ({sorted(nvml_cores)}) are all outside this process's allowed set")
    code = ("import os; from common import distributed as d; d.set_gpu_affinity(0); "
            "print(sorted(os.sched_getaffinity(0)))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == sorted(expected), proc.stderr


def test_benchmark_reports_gpu_telemetry(tmp_path):
    out = tmp_path / "bench.json"
    run_cli("benchmark", "--mode", "inference", "--arch", "resnet18", "--batch-size", "64", "--amp",
            "--iterations", "30", "--warmup", "5", "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["device"] == torch.cuda.get_device_name(0)
    assert result["images_timed"] == 30 * 64
    assert result["throughput_img_s"] == pytest.approx(result["images_timed"] / result["seconds_timed"])
    assert result["peak_memory_mb"] > 11.6e6 * 2 / 2**20  # ResNet-18's 11.7 M weights, in fp32 or fp16, at least
    assert "gpu_memory_used_max_mb" in result.get("gpu", {}), result


def engine_step(clip: float | None, ema: float | None):
    """The engine's step as ``train`` builds it for a CUDA run: fused SGD, fp16 GradScaler, channels_last."""
    from common.builders import build_model
    from common.config import TrainConfig
    from common.registry import get_model_spec
    from common.step import Precision, StepRunner, build_optimization

    torch.backends.cudnn.benchmark = True
    model = build_model(get_model_spec("resnet18"), 10).to(CUDA, memory_format=torch.channels_last)
    precision = Precision(amp=True, dtype="float16")
    opt = build_optimization(
        model, TrainConfig(clip_grad_norm=clip, ema_decay=ema), lr=0.1, steps_per_epoch=100, precision=precision
    )
    return StepRunner(model, nn.CrossEntropyLoss(label_smoothing=0.1), opt, precision), model


@pytest.mark.parametrize("clip, ema", [(None, None), (1.0, 0.999)])
def test_steady_state_training_steps_never_wait_for_the_gpu(clip, ema):
    """Under CUDA's sync debug mode "error", any host-device synchronisation raises: a training step (forward,
    backward, GradScaler unscale/step/update, clipping, schedule, EMA) must run without one after its warm-up."""
    step, model = engine_step(clip, ema)
    images = torch.randn(32, 3, 64, 64, device=CUDA).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (32,), device=CUDA)
    assert getattr(step.optimizer, "_step_supports_amp_scaling", False)  # fused: the scaler needs no .item()
    for _ in range(3):  # warm-up: the scaler's state, momentum buffers, cuDNN autotuning
        step(images, labels)
    torch.cuda.synchronize()
    before = step.opt.scaler.get_scale()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(images, labels)[0] for _ in range(5)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)
    assert step.opt.scaler.get_scale() <= before  # the scaler ran: it only backs off within 2000 steps


def test_evaluation_waits_for_the_gpu_once():
    """Counts, confusion matrix and CUDA-event latencies stay on the device; the host reads them once, however
    many batches."""
    from common.evaluation import evaluate
    from common.step import Precision

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).to(CUDA)
    batches = [(torch.randn(16, 3, 8, 8, device=CUDA), torch.randint(0, 5, (16,), device=CUDA)) for _ in range(6)]
    counts = []
    for n in (2, 6):
        evaluate(model, batches[:n], 5, Precision(amp=True))  # warm-up of the kernels and events
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = evaluate(model, batches[:n], 5, Precision(amp=True))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
        assert result.count == 16 * n and len(result.latencies_ms) == n and int(result.confusion.sum()) == 16 * n
    assert counts == [1, 1], counts


def test_compile_reduce_overhead_trains_with_cuda_graphs(image_tree, tmp_path):
    run_cli("train", "--data", str(image_tree), "--data-backend", "synthetic", "--epochs", "1", "--compile",
            "reduce-overhead", "--output", str(tmp_path), *FAST_TRAIN, "--max-steps-per-epoch", "6")  # fmt: skip
    assert json.loads((tmp_path / "config.json").read_text())["compile"] == "reduce-overhead"
    assert math.isfinite(final(tmp_path)["val.loss"])
