"""The suite's side-by-side comparisons. Each runs both (or all) sides in this process, interleaved round by round so
that drift on a shared machine hits every side alike, and reports ratios of medians:

1. loaders: ``dali-cpu`` (and ``dali-gpu`` on a GPU) against torchvision's ImageFolder + PIL + DataLoader, same
   workers, same augmentation, same generated JPEGs, images per second at the loader's output;
2. the engine's training step against a plain PyTorch loop (``benchmarks/compare.py``'s two sides);
3. inference back ends: eager, channels_last, torch.compile, TorchScript and ONNX Runtime at batch 1, 8 and 64.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks import compare
from common.benchmark import run_benchmark
from common.config import BenchmarkConfig

ENGINE_OVERHEAD_LIMIT_PCT = {"cpu": 10.0, "cuda": 3.0}  # issue 11: the engine must stay under these


def _interleave(sides: dict, rounds: int) -> dict[str, list[float]]:
    """Call every side once per round, in the same order each round."""
    got: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            got[name].append(fn())
    return got


def _summarise(samples: dict[str, list[float]], baseline: str) -> dict:
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "img_s": samples,
        "img_s_median": medians,
        "baseline": baseline,
        "ratio_to_baseline": {k: m / medians[baseline] for k, m in medians.items()},
    }


def loaders(data: Path, device: torch.device, size: int, batch: int, workers: int, batches: int, warmup: int,
            rounds: int) -> dict:  # fmt: skip
    """DALI against ImageFolder + PIL at the loader's output (no model)."""

    def dali(backend: str):
        cfg = BenchmarkConfig(data=str(data), data_backend=backend, mode="data", image_size=size, batch_size=batch,
                              workers=workers, iterations=batches, warmup=warmup, image_check="none",
                              device=str(device))  # fmt: skip
        return lambda: run_benchmark(cfg)["throughput_img_s"]

    sides = {"imagefolder_pil": lambda: compare.imagefolder_throughput(data, size, batch, workers, batches, warmup)}
    sides["dali-cpu"] = dali("dali-cpu")
    if device.type == "cuda":
        sides["dali-gpu"] = dali("dali-gpu")
    result = _summarise(_interleave(sides, rounds), "imagefolder_pil")
    return result | {"comparison": "loaders", "image_size": size, "batch_size": batch, "workers": workers,
                     "batches_timed": batches, "warmup_batches": warmup, "rounds": rounds,
                     "augmentation": "RandomResizedCrop + horizontal flip + normalise (both sides)"}  # fmt: skip


def engine_vs_plain(arch: str, device: torch.device, size: int, batch: int, iterations: int, rounds: int,
                    memory_format: str = "channels_last") -> dict:  # fmt: skip
    """The engine's training step against the plain loop of ``compare.py``, same model, batch and precision."""
    amp = device.type == "cuda"
    setting = compare.Setting(device, amp, "float16", memory_format, None, True)
    result = compare.paired(
        "engine_img_s",
        lambda: compare.engine_throughput(arch, batch, size, iterations, 2, setting),
        "plain_img_s",
        lambda: compare.plain_loop_throughput(arch, batch, size, iterations, 2, setting),
        rounds,
    )
    overhead = 100 * (1 / result["ratio"] - 1)
    limit = ENGINE_OVERHEAD_LIMIT_PCT[device.type]
    return result | {"comparison": "engine_vs_plain_loop", "arch": arch, "image_size": size, "batch_size": batch,
                     "iterations": iterations, "rounds": rounds, "setting": setting.as_dict(),
                     "overhead_pct": overhead, "overhead_limit_pct": limit,
                     "within_limit": overhead < limit}  # fmt: skip


def _timed(fn, x, warmup: int, iterations: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return x.shape[0] * iterations / (time.perf_counter() - start)


def _onnx_session(model: torch.nn.Module, arch: str, size: int, device: torch.device):
    """The model through the repository's own ONNX exporter (dynamic batch), in ONNX Runtime; the providers used
    are TensorRT and CUDA where installed and on a GPU, else the CPU one."""
    import onnxruntime as ort

    from common.serving.export import onnx_bytes
    from common.serving.metadata import ModelMetadata

    meta = ModelMetadata(arch, [str(i) for i in range(1000)], size, size, [0.0] * 3, [1.0] * 3)
    data = onnx_bytes(model, meta, max_batch_size=64)
    wanted = ["CPUExecutionProvider"]
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *wanted]
    providers = [p for p in wanted if p in ort.get_available_providers()]
    session = ort.InferenceSession(data, providers=providers)
    return session, meta, session.get_providers()


def inference_backends(arch: str, device: torch.device, size: int, batch_sizes: tuple[int, ...], iterations: int,
                       rounds: int, compile_model: bool = True) -> dict:  # fmt: skip
    """Eager, channels_last, torch.compile, TorchScript and ONNX Runtime on the same weights and inputs, fp32."""
    from common.registry import create_model

    torch.manual_seed(0)
    model = create_model(arch, num_classes=1000).eval().to(device)
    cl_model = create_model(arch, num_classes=1000).eval().to(device, memory_format=torch.channels_last)
    cl_model.load_state_dict(model.state_dict())
    example = torch.randn(2, 3, size, size, device=device)
    notes = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.freeze(torch.jit.trace(model, example))
    compiled = torch.compile(model, dynamic=False) if compile_model else None
    try:  # ONNX Runtime runs the eager model's own weights, exported from a CPU copy
        with contextlib.redirect_stderr(io.StringIO()):
            session, meta, notes["onnxruntime_providers"] = _onnx_session(_cpu_copy(model, arch), arch, size, device)
    except Exception as e:  # noqa: BLE001 - onnxruntime missing or the export failed: recorded, the rest goes on
        session = None
        notes["onnxruntime_error"] = f"{type(e).__name__}: {e}"[:500]

    def torch_side(m, channels_last=False):
        @torch.inference_mode()
        def call(x):
            return m(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

        return call

    # ONNX Runtime takes host arrays: on a GPU its figures include the copies in and out, as a server's would.
    def ort_side(x):
        return session.run([meta.output_name], {meta.input_name: x.cpu().numpy()})[0]

    sides = {"eager": torch_side(model), "channels_last": torch_side(cl_model, True)}
    if compiled is not None:
        sides["torch.compile"] = torch_side(compiled)
    sides["torchscript"] = torch_side(scripted)
    if session is not None:
        sides["onnxruntime"] = ort_side
    per_batch = {}
    for batch in batch_sizes:
        x = torch.randn(batch, 3, size, size, device=device)
        # Warm-up (compilation for torch.compile, graph optimisation for TorchScript) is outside the timing.
        runs = {name: (lambda fn=fn, x=x: _timed(fn, x, 2, iterations, device)) for name, fn in sides.items()}
        per_batch[str(batch)] = _summarise(_interleave(runs, rounds), "eager")
    return {"comparison": "inference_backends", "arch": arch, "image_size": size, "precision": "fp32",
            "iterations": iterations, "warmup": 2, "rounds": rounds, "batch_sizes": list(batch_sizes),
            "by_batch_size": per_batch} | notes  # fmt: skip


def _cpu_copy(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    from common.registry import create_model

    copy = create_model(arch, num_classes=1000).eval()
    copy.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    return copy


def plan_ratios(device: torch.device, data: Path, quick: bool) -> dict:
    """Every comparison at the suite's scale, as name -> a call that measures it: small models and sizes for
    ``--quick``, ResNet-50 at 224 otherwise."""
    workers = min(8, os.cpu_count() or 1)
    if quick:
        return {
            "ratio_loaders": lambda: loaders(data, device, 224, 32, workers, 8, 2, 2),
            "ratio_engine_vs_plain_loop": lambda: engine_vs_plain("resnet18", device, 64, 16, 4, 3),
            # The point of issue 17's measurement (batch 32, contiguous): where the engine's CPU optimizer lost 11%.
            "ratio_engine_vs_plain_loop_bs32": lambda: engine_vs_plain("resnet18", device, 64, 32, 12, 6, "contiguous"),
            "ratio_inference_backends": lambda: inference_backends("resnet18", device, 64, (1, 8, 64), 5, 2),
        }
    batch = 256 if device.type == "cuda" else 32
    return {
        "ratio_loaders": lambda: loaders(data, device, 224, 128, workers, 10, 2, 3),
        "ratio_engine_vs_plain_loop": lambda: engine_vs_plain("resnet50", device, 224, batch, 20, 3),
        "ratio_inference_backends": lambda: inference_backends("resnet50", device, 224, (1, 8, 64), 20, 3),
    }


def summary(result: dict) -> str:
    """One line for the console."""
    if result["comparison"] == "engine_vs_plain_loop":
        return (f"engine {result['engine_img_s_median']:.1f} vs plain {result['plain_img_s_median']:.1f} img/s, "
                f"overhead {result['overhead_pct']:+.1f}% (limit {result['overhead_limit_pct']:g}%)")  # fmt: skip
    if result["comparison"] == "loaders":
        return ", ".join(f"{k} {v:.2f}x" for k, v in result["ratio_to_baseline"].items()) + " of ImageFolder+PIL"
    return "; ".join(
        f"bs {b}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratio_to_baseline"].items() if k != "eager")
        for b, r in result["by_batch_size"].items()
    ) + " of eager"  # fmt: skip
