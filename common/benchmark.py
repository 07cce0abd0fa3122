"""``convnets benchmark``: images per second and latency of training steps, inference, or the loader alone.

Warm-up iterations are run first and excluded. On GPU every timed iteration ends with a synchronisation,
so latencies are real; utilisation, memory and power are sampled through pynvml while the timed part runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common.atomic import ensure_writable
from common.builders import build_model
from common.checkpoint import atomic_write_text
from common.config import BenchmarkConfig, TrainConfig
from common.data import ImageList, SyntheticLoader, build_loader, default_backend, scan_split
from common.distributed import resolve_device
from common.engine import pipeline_spec, resolve_sizes
from common.errors import UserError
from common.registry import get_model_spec
from common.step import Precision, StepRunner, build_optimization, compile_model, resolve_amp
from common.telemetry import GpuSampler, host_peak_rss_mb


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader):
    """Batches from ``loader`` for as many epochs as the benchmark needs."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def _time_loop(step_fn, batches, warmup: int, iterations: int, device) -> tuple[list[float], int]:
    """Run ``step_fn`` on ``warmup`` then ``iterations`` batches; per-iteration seconds and images timed."""
    for _ in range(warmup):
        step_fn(*next(batches))
    _sync(device)
    times, images = [], 0
    for _ in range(iterations):
        start = time.perf_counter()
        x, y = next(batches)
        step_fn(x, y)
        _sync(device)
        times.append(time.perf_counter() - start)
        images += y.shape[0]
    return times, images


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    """Time one mode and return (and optionally write) the result dictionary."""
    if cfg.json:
        ensure_writable(Path(cfg.json).parent, "the result")  # before the measurement, which is lost otherwise
    device = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, device))
    spec = get_model_spec(cfg.arch)
    image_size, resize = resolve_sizes(spec, cfg.image_size, cfg.val_resize)
    backend = cfg.data_backend or ("synthetic" if cfg.data is None else default_backend(device))
    if backend != "synthetic" and cfg.data is None:
        raise UserError(f"--data-backend {backend} needs --data DIR")
    if cfg.mode == "data" and backend == "synthetic":
        raise UserError("--mode data measures a real loader: give --data DIR and a --data-backend other than synthetic")
    pipe = pipeline_spec(cfg, image_size, resize)
    train = cfg.mode != "inference"
    if backend == "synthetic":
        loader = SyntheticLoader(pipe, cfg.num_classes or 1000, cfg.warmup + cfg.iterations, device)
    else:
        images = _split(Path(cfg.data), train)
        loader = build_loader(backend, images, pipe, train, device)
    batches = endless(loader)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.cuda.reset_peak_memory_stats(device)

    if cfg.mode == "data":
        step_fn = lambda x, y: None  # noqa: E731 - the loader alone, measured at its output (on the device)
    else:
        memory_format = torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format
        model = build_model(spec, cfg.num_classes or 1000, cfg.width_mult).to(device, memory_format=memory_format)
        precision = Precision(cfg.amp, cfg.amp_dtype)
        step_fn = _train_step(model, cfg, precision) if train else _inference_step(model, cfg, precision)

    sampler = GpuSampler(device.index or 0) if device.type == "cuda" else None
    if sampler:
        with sampler:
            times, n_images = _time_loop(step_fn, batches, cfg.warmup, cfg.iterations, device)
    else:
        times, n_images = _time_loop(step_fn, batches, cfg.warmup, cfg.iterations, device)
    latency = np.array(times) * 1000
    result = {
        "mode": cfg.mode,
        "arch": cfg.arch,
        "width_mult": cfg.width_mult,
        "batch_size": cfg.batch_size,
        "image_size": image_size,
        "amp": cfg.amp,
        "amp_dtype": cfg.amp_dtype if cfg.amp else None,
        "memory_format": cfg.memory_format,
        "data_backend": backend,
        "workers": cfg.workers,
        "iterations": cfg.iterations,
        "warmup": cfg.warmup,
        "compile": cfg.compile,
        "images_timed": n_images,
        "seconds_timed": float(np.sum(times)),
        "throughput_img_s": n_images / float(np.sum(times)),
        "latency_ms": {f"p{q}": float(np.percentile(latency, q)) for q in (50, 90, 95, 99)}
        | {"mean": float(latency.mean())},
        "device": device_name(device),
        # On GPU: what torch's allocator held at most. DALI's own device pool and nvJPEG buffers are not in it;
        # the NVML figure under "gpu" (whole-device memory in use) is.
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else host_peak_rss_mb(),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "host RSS",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    if sampler and sampler.summary():
        result["gpu"] = sampler.summary()
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2))
    return result


def _split(root: Path, train: bool) -> ImageList:
    split = root / ("train" if train else "val")
    return scan_split(split if split.is_dir() else root)


def _train_step(model: nn.Module, cfg: BenchmarkConfig, precision: Precision):
    """The engine's own training step, built as ``train`` builds it (fused SGD over the recipe's parameter
    groups, its schedule, a GradScaler for fp16), on the model compiled in ``cfg.compile``'s mode."""
    model.train()
    opt = build_optimization(model, TrainConfig(), lr=0.1, steps_per_epoch=1000, precision=precision)
    runner = StepRunner(compile_model(model, cfg.compile), nn.CrossEntropyLoss(label_smoothing=0.1), opt, precision,
                        cuda_graphs=cfg.compile == "reduce-overhead")  # fmt: skip
    return lambda x, y: runner(x, y)


def _inference_step(model: nn.Module, cfg: BenchmarkConfig, precision: Precision):
    model.eval()
    compiled = compile_model(model, cfg.compile)

    @torch.no_grad()
    def step(x, y):
        with precision.autocast(x.device):
            return compiled(x)

    return step
