"""Side-by-side measurements, each pair in one process and interleaved so machine drift hits both sides:

1. the engine's training step (``convnets benchmark --mode train``) against a plain PyTorch loop on the same
   model, batch and synthetic data: the engine's overhead;
2. the ``dali-cpu`` loader against torchvision's ImageFolder + DataLoader with PIL at the same number of workers.

    python benchmarks/compare.py --data data/fashion-mnist [--arch resnet50 --image-size 64 --batch-size 32]

Results go to ``benchmarks/results/<device>/compare_*.json`` with the device and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from common.benchmark import device_name, run_benchmark
from common.checkpoint import atomic_write_text
from common.config import BenchmarkConfig
from common.registry import create_model

RESULTS = Path(__file__).resolve().parent / "results"


def plain_loop_throughput(arch: str, batch: int, size: int, iterations: int, warmup: int) -> float:
    """The loop anyone would write: model, SGD, cross-entropy, forward/backward/step."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=1000).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3e-5)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    for i in range(warmup + iterations):
        if i == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()
    return batch * iterations / (time.perf_counter() - start)


def engine_throughput(arch: str, batch: int, size: int, iterations: int, warmup: int) -> float:
    cfg = BenchmarkConfig(arch=arch, batch_size=batch, image_size=size, iterations=iterations, warmup=warmup,
                          mode="train", data_backend="synthetic")  # fmt: skip
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loader-size", type=int, default=224, help="output size of both loaders")
    p.add_argument("--loader-batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=40)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version()}
    out = RESULTS / ("cpu" if device.type == "cpu" else device_name(device).replace(" ", "-"))
    out.mkdir(parents=True, exist_ok=True)

    engine = paired(
        "engine_img_s", lambda: engine_throughput(args.arch, args.batch_size, args.image_size, args.iterations, 2),
        "plain_img_s", lambda: plain_loop_throughput(args.arch, args.batch_size, args.image_size, args.iterations, 2),
        args.rounds,
    )  # fmt: skip
    engine |= meta | {"arch": args.arch, "batch_size": args.batch_size, "image_size": args.image_size,
                      "overhead_pct": 100 * (1 / engine["ratio"] - 1)}  # fmt: skip
    atomic_write_text(out / "compare_engine_vs_plain_loop.json", json.dumps(engine, indent=2))
    print(f"engine vs plain loop ({args.arch}, batch {args.batch_size}, {args.image_size}px, {meta['device']}): "
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
