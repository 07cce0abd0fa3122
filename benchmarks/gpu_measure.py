"""The measuring steps of ``benchmarks/gpu_session.py``: ResNet-50 training on every backend beside a plain loop and
timm's resnet50, ``--compile``, inference back ends, and the other recipes' models. Every figure is timed by the
engine's own ``run_benchmark`` (what ``convnets benchmark`` runs; ``command`` says how to rerun it) or by
``benchmarks/compare.py``'s plain loop, and carries GPU utilisation, memory and power (NVML), images/s per watt
and model FLOPs utilisation.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import numpy as np
import torch

from benchmarks import compare
from benchmarks.gpu_steps import Context, Skip, nvml_name, peak_flops, sync
from common.benchmark import run_benchmark
from common.config import BenchmarkConfig
from common.info import count_model

BACKENDS = ("synthetic", "pytorch", "dali-gpu", "dali-cpu")
OTHER_MODELS = (("mobilenet_v1", "mobilenet_v1", 1.0), ("mobilenet_v1_0.5", "mobilenet_v1", 0.5),
                ("mobilenet_v2", "mobilenet_v2", None), ("vgg16_bn", "vgg16_bn", None))  # fmt: skip


@functools.lru_cache
def _forward_macs(arch: str, image_size: int, width: float | None) -> int:
    return count_model(arch, image_size, 1000, width).macs


def figures(img_s: float, arch: str, width: float | None, image_size: int, train: bool, gpu: dict | None) -> dict:
    """Model FLOPs utilisation and images per watt of one throughput. FLOPs per image from ``common.info``'s
    counter (2 per multiply-add), times 3 for a training step (the backward pass costs about twice the forward)."""
    flops = 2 * _forward_macs(arch, image_size, width) * (3 if train else 1)
    peak = peak_flops(nvml_name())
    power = (gpu or {}).get("gpu_power_mean_w")
    return {
        "flops_per_image": flops,
        "achieved_tflops": flops * img_s / 1e12,
        "peak_fp16_dense_tflops": peak / 1e12 if peak else None,
        "mfu": flops * img_s / peak if peak else None,
        "img_s_per_w": img_s / power if power else None,
    }


def command_line(cfg: BenchmarkConfig) -> str:
    """The ``convnets benchmark`` command that runs ``cfg`` (the options that differ from the defaults)."""
    default = BenchmarkConfig()
    words = ["convnets", "benchmark"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            words += [flag, str(value)]
    return " ".join(words)


def engine(ctx: Context, arch: str | None = None, mode: str = "train", backend: str = "synthetic",
           width: float | None = None, memory_format: str = "channels_last", compile: str | None = None,
           batch: int | None = None) -> dict:  # fmt: skip
    """One ``run_benchmark`` figure with its FLOPs, power and the command that reproduces it."""
    s = ctx.sizes
    arch = arch or s.arch
    if backend.startswith("dali"):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise Skip(
                "DALI is not installed (on the GPU it comes in the DALI call: benchmarks/GPU_SESSION.md)"
            ) from None
    if backend == "dali-gpu" and ctx.device.type != "cuda":
        raise Skip("dali-gpu needs CUDA")
    if backend != "synthetic" and not (ctx.jpegs / "made.json").exists():
        raise Skip("no JPEGs: the data step did not finish")
    cfg = BenchmarkConfig(arch=arch, width_mult=width, mode=mode, batch_size=batch or s.batch,
                          image_size=s.image_size, warmup=s.warmup, data_backend=backend,
                          iterations=s.inference_iterations if mode == "inference" else s.iterations,
                          data=str(ctx.jpegs) if backend != "synthetic" else None, device=s.device, amp=s.amp,
                          amp_dtype="float16", memory_format=memory_format, compile=compile, workers=s.workers,
                          image_check="none", num_classes=1000)  # fmt: skip
    result = run_benchmark(cfg)
    result |= figures(result["throughput_img_s"], arch, width, result["image_size"], mode == "train",
                      result.get("gpu"))  # fmt: skip
    return result | {"command": command_line(cfg), "headline": _headline(result)}


def _headline(r: dict) -> str:
    mfu = f", MFU {100 * r['mfu']:.0f}%" if r.get("mfu") else ""
    watt = f", {r['img_s_per_w']:.1f} img/s/W" if r.get("img_s_per_w") else ""
    return f"{r['throughput_img_s']:.0f} img/s{mfu}{watt}"


def plain(ctx: Context, make_model) -> dict:
    """``compare.py``'s plain loop (AMP, channels_last, fused SGD on the GPU) on ``make_model()``, with NVML."""
    from common.telemetry import GpuSampler

    s = ctx.sizes
    setting = compare.Setting(ctx.device, s.amp, "float16", "channels_last", None, True)
    torch.manual_seed(0)
    model = make_model()
    sampler = GpuSampler(0) if ctx.device.type == "cuda" else None
    if sampler:
        with sampler:
            img_s = compare.plain_loop_model_throughput(model, s.batch, s.image_size, s.iterations, s.warmup, setting)
    else:
        img_s = compare.plain_loop_model_throughput(model, s.batch, s.image_size, s.iterations, s.warmup, setting)
    gpu = sampler.summary() if sampler else None
    result = {"throughput_img_s": img_s, "arch": s.arch, "batch_size": s.batch, "image_size": s.image_size,
              "amp": s.amp, "memory_format": "channels_last", "iterations": s.iterations, "warmup": s.warmup,
              "setting": setting.as_dict(), "gpu": gpu}  # fmt: skip
    result |= figures(img_s, s.arch, None, s.image_size, True, gpu)
    return result | {"headline": _headline(result)}


def _timm_model(arch: str):
    try:
        import timm
    except ImportError:
        raise Skip("timm is not installed here (it is on the GPU machine)") from None
    return timm.create_model(arch, num_classes=1000)


def train_resnet50(ctx: Context, backends: tuple[str, ...] = BACKENDS, baselines: bool = True) -> None:
    """ResNet-50 v1.5 training at AMP fp16, channels_last, batch 256: the engine on each backend, then the same
    model in the plain loop and timm's resnet50 in it, and the engine's images/s over each."""
    from common.registry import create_model

    got = {b: ctx.measure(f"engine_{b}", lambda b=b: engine(ctx, backend=b)) for b in backends}
    if not baselines:
        return
    arch = ctx.sizes.arch
    ours = ctx.measure("plain_loop", lambda: plain(ctx, lambda: create_model(arch, num_classes=1000)))
    timm = ctx.measure("plain_loop_timm", lambda: plain(ctx, lambda: _timm_model(arch)))

    def ratios() -> dict:
        engine_img_s = got["synthetic"].get("throughput_img_s") if "synthetic" in got else None
        if not engine_img_s:
            raise Skip("no synthetic engine figure to compare")
        sides = (("plain_loop", ours), ("timm_plain_loop", timm))
        out = {
            f"engine_over_{name}": engine_img_s / r["throughput_img_s"]
            for name, r in sides
            if r.get("throughput_img_s")
        }
        return out | {"headline": ", ".join(f"{k} {v:.3f}" for k, v in out.items())}

    ctx.measure("engine_vs_baselines", ratios)


def train_compile(ctx: Context) -> None:
    """``--compile`` on the fastest backend train_resnet50 measured."""
    names = {f"engine_{b}" for b in BACKENDS}
    eager = {r["data_backend"]: r for r in ctx.previous_records("train_resnet50")
             if r["status"] == "ok" and r["name"] in names}  # fmt: skip

    def run() -> dict:
        if not eager:
            raise Skip("train_resnet50 measured no backend")
        best = max(eager.values(), key=lambda r: r["throughput_img_s"])
        result = engine(ctx, backend=best["data_backend"], compile="default")
        result["speedup_over_eager"] = result["throughput_img_s"] / best["throughput_img_s"]
        if ctx.dry:
            result["compile_backend"] = "eager (dry: TorchDynamo capture only)"
        result["headline"] += f", {result['speedup_over_eager']:.2f}x eager ({best['data_backend']})"
        return result

    ctx.measure("engine_compiled_best_backend", run)


def inference(ctx: Context) -> None:
    """ResNet-50 inference at each batch size: eager (fp16 autocast on the GPU), channels_last, then ONNX Runtime,
    and torch.compile with CUDA graphs last (its compilation, once per batch size, is what may run out of time)."""
    s = ctx.sizes
    for batch in s.inference_batches:
        for name, memory_format in (("eager", "contiguous"), ("channels_last", "channels_last")):
            ctx.measure(f"{name}_bs{batch}", lambda b=batch, m=memory_format: engine(
                ctx, mode="inference", memory_format=m, batch=b))  # fmt: skip
    for batch in s.inference_batches:
        ctx.measure(f"onnxruntime_bs{batch}", lambda b=batch: onnxruntime(ctx, b))
    for batch in s.inference_batches:
        ctx.measure(f"compiled_cuda_graphs_bs{batch}", lambda b=batch: engine(
            ctx, mode="inference", compile="reduce-overhead", batch=b))  # fmt: skip


_sessions: dict = {}


def onnxruntime(ctx: Context, batch: int) -> dict:
    """The repository's ONNX export of ResNet-50 (fp32, dynamic batch, exported once) in ONNX Runtime with the CUDA
    provider on the GPU (the CPU one in a dry run); per-batch latency includes the host copies in and out."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed") from None
    from benchmarks.ratios import _onnx_session
    from common.registry import create_model

    wanted = "CUDAExecutionProvider" if ctx.device.type == "cuda" else "CPUExecutionProvider"
    if wanted not in ort.get_available_providers():
        raise Skip(f"ONNX Runtime has no {wanted} here (it has {', '.join(ort.get_available_providers())})")
    s = ctx.sizes
    if "session" not in _sessions:
        torch.manual_seed(0)
        model = create_model(s.arch, num_classes=1000).eval()
        start = time.perf_counter()
        _sessions["session"] = _onnx_session(model, s.arch, s.image_size, ctx.device)
        _sessions["export_s"] = time.perf_counter() - start
    session, meta, providers = _sessions["session"]
    x = np.random.default_rng(0).standard_normal((batch, 3, s.image_size, s.image_size), dtype=np.float32)
    times = []
    for i in range(s.warmup + s.inference_iterations):
        start = time.perf_counter()
        session.run([meta.output_name], {meta.input_name: x})
        if i >= s.warmup:
            times.append(time.perf_counter() - start)
    latency = np.array(times) * 1000
    img_s = batch * len(times) / sum(times)
    result = {"throughput_img_s": img_s, "batch_size": batch, "providers": providers, "precision": "fp32",
              **figures(img_s, s.arch, None, s.image_size, False, None),
              "export_and_session_s": _sessions["export_s"], "latency_ms": {f"p{q}": float(np.percentile(latency, q))
              for q in (50, 90, 99)} | {"median": statistics.median(latency.tolist())}}  # fmt: skip
    return result | {"headline": f"{img_s:.0f} img/s, p50 {result['latency_ms']['p50']:.2f} ms ({providers[0]})"}


def other_models(ctx: Context) -> None:
    """MobileNet v1 (1.0, 0.5), MobileNet v2 and VGG-16-BN at AMP, channels_last, one batch size: training, then
    inference."""
    for name, arch, width in OTHER_MODELS:
        for mode in ("train", "inference"):
            ctx.measure(f"{name}_{mode}", lambda a=arch, w=width, m=mode: engine(ctx, arch=a, width=w, mode=m))
    sync(ctx.device)
