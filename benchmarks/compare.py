"""Side-by-side measurements, each pair in one process and interleaved so machine drift hits both sides:

1. the engine's training step (``convnets benchmark --mode train``) against a plain PyTorch loop on the same
   model, batch and synthetic data, and on the same device, precision, memory format and compile mode (one set
   of options feeds both): the engine's overhead;
2. the ``dali-cpu`` loader against torchvision's ImageFolder + DataLoader with PIL at the same number of workers.

    python benchmarks/compare.py --data data/fashion-mnist [--arch resnet50 --image-size 64 --batch-size 32]
        [--device auto|cuda|cpu --amp --amp-dtype float16 --memory-format channels_last --compile]

Results go to ``benchmarks/results/<device>/compare_*.json`` with the device and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from common.benchmark import device_name, run_benchmark
from common.checkpoint import atomic_write_text
from common.config import COMPILE_MODES, BenchmarkConfig
from common.distributed import resolve_device
from common.registry import create_model
from common.step import resolve_amp

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Setting:
    """What both sides of the engine comparison share: device, precision, memory format, compile mode."""

    device: torch.device
    amp: bool
    amp_dtype: str
    memory_format: str
    compile: str | None  # torch.compile mode, None: eager
    tf32: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"device": str(self.device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop_throughput(arch: str, batch: int, size: int, iterations: int, warmup: int, s: Setting) -> float:
    """The loop anyone would write: model, SGD, cross-entropy, forward/backward/step, with the usual autocast and
    GradScaler when mixed precision is on."""
    torch.manual_seed(0)
    return plain_loop_model_throughput(create_model(arch, num_classes=1000), batch, size, iterations, warmup, s)


def plain_loop_model_throughput(model: nn.Module, batch: int, size: int, iterations: int, warmup: int,
                                s: Setting) -> float:  # fmt: skip
    """``plain_loop_throughput`` on a model built elsewhere (timm's, say), with 1000 classes."""
    if s.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = s.tf32
    memory_format = torch.channels_last if s.memory_format == "channels_last" else torch.contiguous_format
    model = model.to(s.device, memory_format=memory_format).train()
    # torch's fused SGD on a GPU (as the engine uses; it also spares the GradScaler's host sync), and on a CPU
    # what anyone gets without asking: torch's default, its per-parameter loop. (This loop once asked for foreach
    # on the CPU too, as the engine did, and so never showed what that cost the engine: issue 17.)
    fused = {"fused": True} if s.device.type == "cuda" else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3e-5, **fused)
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp and s.amp_dtype == "float16")
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    step_model = torch.compile(model, mode=s.compile) if s.compile else model
    x = torch.randn(batch, 3, size, size, device=s.device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), device=s.device)
    for i in range(warmup + iterations):
        if i == warmup:
            _sync(s.device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(s.device.type, dtype=getattr(torch, s.amp_dtype), enabled=s.amp):
            loss = criterion(step_model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _sync(s.device)
    return batch * iterations / (time.perf_counter() - start)


def engine_throughput(arch: str, batch: int, size: int, iterations: int, warmup: int, s: Setting) -> float:
    cfg = BenchmarkConfig(arch=arch, batch_size=batch, image_size=size, iterations=iterations, warmup=warmup,
                          mode="train", data_backend="synthetic", device=str(s.device), amp=s.amp,
                          amp_dtype=s.amp_dtype, memory_format=s.memory_format, compile=s.compile,
                          tf32=s.tf32)  # fmt: skip
    return run_benchmark(cfg)["throughput_img_s"]


def imagefolder_throughput(data: Path, size: int, batch: int, workers: int, batches: int, warmup: int) -> float:
    """torchvision's ImageFolder + PIL + DataLoader, with the same training transforms."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    dataset = datasets.ImageFolder(str(data / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * batches / (time.perf_counter() - start)


def dali_throughput(data: Path, size: int, batch: int, workers: int, batches: int, warmup: int) -> float:
    cfg = BenchmarkConfig(data=str(data), data_backend="dali-cpu", mode="data", image_size=size, batch_size=batch,
                          workers=workers, iterations=batches, warmup=warmup, image_check="none")  # fmt: skip
    return run_benchmark(cfg)["throughput_img_s"]


def paired(name_a, fn_a, name_b, fn_b, rounds: int) -> dict:
    """Alternate A and B ``rounds`` times; report medians and the ratio of medians."""
    a, b = [], []
    for _ in range(rounds):
        a.append(fn_a())
        b.append(fn_b())
    ma, mb = statistics.median(a), statistics.median(b)
    return {name_a: a, name_b: b, f"{name_a}_median": ma, f"{name_b}_median": mb, "ratio": ma / mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu, for both sides (default: auto)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on both sides (default: on with CUDA, off on CPU, as the engine)")  # fmt: skip
    p.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--memory-format", choices=("contiguous", "channels_last"), default="contiguous")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile both sides in this mode (alone: default)")  # fmt: skip
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loader-size", type=int, default=224, help="output size of both loaders")
    p.add_argument("--loader-batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=40)
    args = p.parse_args()
    device = resolve_device(args.device)
    setting = Setting(device, resolve_amp(args.amp, device), args.amp_dtype, args.memory_format, args.compile,
                      args.tf32)  # fmt: skip
    meta = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version()}
    out = RESULTS / ("cpu" if device.type == "cpu" else device_name(device).replace(" ", "-"))
    out.mkdir(parents=True, exist_ok=True)

    engine = paired(
        "engine_img_s",
        lambda: engine_throughput(args.arch, args.batch_size, args.image_size, args.iterations, 2, setting),
        "plain_img_s",
        lambda: plain_loop_throughput(args.arch, args.batch_size, args.image_size, args.iterations, 2, setting),
        args.rounds,
    )
    engine |= meta | {"arch": args.arch, "batch_size": args.batch_size, "image_size": args.image_size,
                      "setting": setting.as_dict(), "overhead_pct": 100 * (1 / engine["ratio"] - 1)}  # fmt: skip
    atomic_write_text(out / "compare_engine_vs_plain_loop.json", json.dumps(engine, indent=2))
    precision = f"AMP {setting.amp_dtype}" if setting.amp else "fp32"
    print(f"engine vs plain loop ({args.arch}, batch {args.batch_size}, {args.image_size}px, {meta['device']}, "
          f"{precision}, {setting.memory_format}{f', compiled ({setting.compile})' if setting.compile else ''}): "
          f"{engine['engine_img_s_median']:.1f} vs {engine['plain_img_s_median']:.1f} img/s, "
          f"overhead {engine['overhead_pct']:+.1f}%")  # fmt: skip

    loaders = paired(
        "dali_cpu_img_s",
        lambda: dali_throughput(
            args.data, args.loader_size, args.loader_batch_size, args.workers, args.loader_batches, 3
        ),
        "imagefolder_pil_img_s",
        lambda: imagefolder_throughput(
            args.data, args.loader_size, args.loader_batch_size, args.workers, args.loader_batches, 3
        ),  # fmt: skip
        args.rounds,
    )
    loaders |= meta | {"data": str(args.data), "image_size": args.loader_size, "batch_size": args.loader_batch_size,
                       "workers": args.workers}  # fmt: skip
    atomic_write_text(out / "compare_dali_vs_imagefolder.json", json.dumps(loaders, indent=2))
    print(f"dali-cpu vs ImageFolder+PIL ({args.workers} workers, {args.loader_size}px, batch "
          f"{args.loader_batch_size}): {loaders['dali_cpu_img_s_median']:.0f} vs "
          f"{loaders['imagefolder_pil_img_s_median']:.0f} img/s, {loaders['ratio']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
