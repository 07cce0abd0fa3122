"""The benchmark suite: throughput and latency of every recipe's main models over batch sizes and precisions, with
synthetic data and the real data pipelines, then the side-by-side ratios of ``benchmarks/ratios.py``.

    bash benchmarks/run.sh [--quick]              # the suite, then the report
    python -m benchmarks.suite [--quick] [--models resnet18,mobilenet_v1_0.5] [--batch-sizes 8,32] ...

Every point is timed by the engine's own ``run_benchmark`` (warm-up excluded), ``--repeats`` times; one JSON file
per point under ``benchmarks/results/<device>/suite_*.json`` holds the mean and standard deviation over the repeats,
the resolved arguments, the device, the library versions and the machine's load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.environment import ROOT, environment, precision_options, precisions
from common.checkpoint import atomic_write_text
from common.errors import UserError

RESULTS = ROOT / "benchmarks" / "results"
SUITE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Model:
    """A model as the report names it: the registry name and, for MobileNet v1, a width multiplier."""

    name: str
    arch: str
    width_mult: float | None = None


MODELS = {
    m.name: m
    for m in (
        Model("resnet50", "resnet50"),
        Model("resnet18", "resnet18"),
        Model("mobilenet_v1", "mobilenet_v1", 1.0),
        Model("mobilenet_v1_0.5", "mobilenet_v1", 0.5),
        Model("mobilenet_v2", "mobilenet_v2"),
        Model("vgg16_bn", "vgg16_bn"),
    )
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run of the suite measures."""

    models: tuple[str, ...]
    train_batch_sizes: tuple[int, ...]
    inference_batch_sizes: tuple[int, ...]
    precisions: tuple[str, ...] | None  # None: every precision the device supports
    image_size: int | None  # None: each model's own (224)
    iterations: int
    warmup: int
    repeats: int
    pipelines: tuple[str, ...]  # real data backends timed in training mode on generated JPEGs
    pipeline_model: str
    grid_widths: tuple[float, ...]  # MobileNet v1 width x resolution grid (inference)
    grid_sizes: tuple[int, ...]
    grid_batch_size: int
    ratios: bool
    jpegs: int  # generated JPEGs for the real pipelines and the loader comparison


FULL = Plan(tuple(MODELS), (32, 64, 128, 256), (1, 8, 32, 64, 128, 256), None, None, 50, 10, 3,
            ("dali-gpu", "dali-cpu", "pytorch"), "resnet50", (1.0, 0.75, 0.5, 0.25), (224, 192, 160, 128), 64,
            True, 2048)  # fmt: skip
# Under 10 minutes on 2 CPU cores: 64-pixel inputs, two batch sizes, few iterations, the small grid corners.
QUICK = Plan(tuple(MODELS), (16,), (1, 16), None, 64, 3, 2, 2, ("dali-gpu", "dali-cpu", "pytorch"), "resnet18",
             (1.0, 0.5), (224, 128), 8, True, 384)  # fmt: skip


def _csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v)


def parse_args(argv: list[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    """The plan (``--quick`` or the full one, with any option overriding it) and the remaining options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small subset (under 10 minutes on 2 CPU cores)")
    p.add_argument("--models", type=_csv(str), help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--train-batch-sizes", type=_csv(int))
    p.add_argument("--inference-batch-sizes", type=_csv(int))
    p.add_argument("--precisions", type=_csv(str), help="fp32, tf32, amp-fp16, amp-bf16 (default: all supported)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--iterations", type=int, help="timed iterations per repeat")
    p.add_argument("--warmup", type=int, help="untimed iterations before each repeat")
    p.add_argument("--repeats", type=int)
    p.add_argument("--pipelines", type=_csv(str), help="real data backends to time (empty: none)")
    p.add_argument("--no-grid", action="store_true", help="skip the MobileNet width x resolution grid")
    p.add_argument("--no-ratios", action="store_true", help="skip the side-by-side comparisons")
    p.add_argument("--data", type=Path, help="an ImageFolder root with train/ (default: generated JPEGs)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--out", type=Path, help="result folder (default: benchmarks/results/<device>)")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {
        "models": args.models,
        "train_batch_sizes": args.train_batch_sizes,
        "inference_batch_sizes": args.inference_batch_sizes,
        "precisions": args.precisions,
        "image_size": args.image_size,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "pipelines": args.pipelines,
    }
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_grid:
        plan = dataclasses.replace(plan, grid_widths=(), grid_sizes=())
    if args.no_ratios:
        plan = dataclasses.replace(plan, ratios=False)
    unknown = [m for m in plan.models if m not in MODELS]
    if unknown:
        raise UserError(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    bad = [p for p in plan.precisions or () if p not in ("fp32", "tf32", "amp-fp16", "amp-bf16")]
    if bad:
        raise UserError(f"--precisions: unknown {', '.join(bad)} (known: fp32, tf32, amp-fp16, amp-bf16)")
    if min(plan.iterations, plan.repeats) < 1 or plan.warmup < 0:
        raise UserError("--iterations and --repeats must be at least 1, --warmup at least 0")
    return plan, args


def point_name(mode: str, model: str, precision: str, batch: int, backend: str, image_size: int) -> str:
    return f"suite_{mode}_{model}_{precision}_bs{batch}_{backend}_{image_size}px"


def measure_point(model: Model, mode: str, precision: str, batch: int, plan: Plan, device: str, *,
                  image_size: int | None = None, backend: str = "synthetic",
                  data: Path | None = None) -> dict:  # fmt: skip
    """One point, ``plan.repeats`` times through ``run_benchmark``; mean and standard deviation over repeats."""
    from common.benchmark import run_benchmark
    from common.config import BenchmarkConfig
    from common.info import count_model

    cfg = BenchmarkConfig(arch=model.arch, width_mult=model.width_mult, mode=mode, batch_size=batch,
                          image_size=image_size or plan.image_size, iterations=plan.iterations, warmup=plan.warmup,
                          data_backend=backend, data=str(data) if data else None, device=device,
                          memory_format="channels_last", workers=min(8, os.cpu_count() or 1), image_check="none",
                          **precision_options(precision))  # fmt: skip
    load_before = list(os.getloadavg())
    runs = [run_benchmark(cfg) for _ in range(plan.repeats)]
    first = runs[0]
    throughputs = [r["throughput_img_s"] for r in runs]
    counts = count_model(model.arch, first["image_size"], 1000, model.width_mult)
    # A training step is a forward and a backward pass; the backward costs about twice the forward.
    macs_per_image = counts.macs * (3 if mode == "train" else 1)
    result = {k: v for k, v in first.items() if k not in ("throughput_img_s", "latency_ms", "gpu", "json")}
    result |= {
        "suite_version": SUITE_VERSION,
        "kind": "point",
        "model": model.name,
        "precision": precision,
        "tf32": cfg.tf32,
        "repeats": plan.repeats,
        "images_timed": sum(r["images_timed"] for r in runs),
        "seconds_timed": sum(r["seconds_timed"] for r in runs),
        "throughput_img_s": statistics.fmean(throughputs),
        "throughput_img_s_std": statistics.stdev(throughputs) if len(runs) > 1 else 0.0,
        "throughput_img_s_repeats": throughputs,
        "latency_ms": {k: statistics.fmean(r["latency_ms"][k] for r in runs) for k in first["latency_ms"]},
        "latency_ms_note": "per-repeat percentiles of one iteration (one batch), averaged over the repeats",
        "params": counts.params,
        "macs_per_image_forward": counts.macs,
        "macs_per_image_timed": macs_per_image,
        "achieved_macs_per_s": macs_per_image * statistics.fmean(throughputs),
        "args": dataclasses.asdict(cfg),
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
    }
    gpu = [r["gpu"] for r in runs if r.get("gpu")]
    if gpu:
        result["gpu"] = {k: statistics.fmean(g[k] for g in gpu if k in g) for k in gpu[0]}
    return result


def make_jpegs(root: Path, count: int, classes: int = 4, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """An ImageFolder tree of ``count`` ImageNet-sized JPEGs (smooth random colour fields, so they compress and
    decode like photographs rather than like noise), split evenly over ``classes`` folders of train/ and val/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-12, 13, (size[1], size[0], 3)), 0, 255)
        split = "val" if i % 8 == 0 else "train"
        Image.fromarray(noisy.astype(np.uint8)).save(root / split / f"class{i % classes}" / f"{i:05d}.jpg", quality=90)
    return root


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _write(out: Path, name: str, result: dict, env: dict, command: str) -> Path:
    path = out / f"{name}.json"
    atomic_write_text(path, json.dumps(result | {"name": name, "command": command, "environment": env}, indent=2))
    return path


def choose_precisions(asked: tuple[str, ...] | None, supported: list[str]) -> tuple[list[str], list[str]]:
    """``(timed, skipped)``: the precisions asked for (every supported one when None) that the device runs natively,
    and those asked for that it does not."""
    chosen = [p for p in (asked or supported) if p in supported]
    return chosen, sorted(set(asked or ()) - set(chosen))


def _say(text: str) -> None:
    print(text, flush=True)


def run(plan: Plan, args: argparse.Namespace) -> list[Path]:
    """Run the plan; return the files written."""
    from common.distributed import resolve_device

    device = resolve_device(args.device)
    env = environment(device)
    out = args.out or RESULTS / env["device_slug"]
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.suite " + shlex.join(sys.argv[1:])
    chosen, skipped = choose_precisions(plan.precisions, precisions(device))
    if skipped:
        _say(f"suite: {', '.join(skipped)} not supported natively on {device}: skipped")
    _say(f"suite: {env.get('gpu_name', env['cpu_model'])}, precisions {', '.join(chosen)}, "
         f"{plan.repeats} repeats of {plan.iterations} iterations after {plan.warmup} warm-up -> {out}")  # fmt: skip
    written: list[Path] = []
    start = time.perf_counter()

    def record(name: str, result: dict) -> None:
        written.append(_write(out, name, result, environment(device) | {"loadavg_at_start": env["loadavg"]}, command))
        lat = result["latency_ms"]["p99"]
        _say(f"  {name}: {result['throughput_img_s']:.1f} +- {result['throughput_img_s_std']:.1f} img/s, "
             f"p99 {lat:.1f} ms  [{time.perf_counter() - start:.0f} s]")  # fmt: skip

    for name in plan.models:
        model = MODELS[name]
        for precision in chosen:
            for mode, sizes in (("train", plan.train_batch_sizes), ("inference", plan.inference_batch_sizes)):
                for batch in sizes:
                    result = measure_point(model, mode, precision, batch, plan, args.device)
                    record(point_name(mode, name, precision, batch, "synthetic", result["image_size"]), result)

    grid_precision = chosen[-1] if device.type == "cuda" else "fp32"
    for width in plan.grid_widths:
        for size in plan.grid_sizes:
            model = Model(f"mobilenet_v1_{width:g}", "mobilenet_v1", width)
            result = measure_point(model, "inference", grid_precision, plan.grid_batch_size, plan, args.device,
                                   image_size=size)  # fmt: skip
            result["grid"] = "mobilenet_v1 width x resolution"
            record(point_name("inference", model.name, grid_precision, plan.grid_batch_size, "synthetic", size), result)

    pipelines = [b for b in plan.pipelines if (b != "dali-gpu" or device.type == "cuda")]
    if not dali_available():
        pipelines = [b for b in pipelines if not b.startswith("dali")]
        _say("suite: DALI is not installed (pip install -e '.[dali]'): the DALI pipelines are skipped")
    with tempfile.TemporaryDirectory(prefix="convnets-bench-") as tmp:
        data = args.data
        if (pipelines or plan.ratios) and data is None:
            data = make_jpegs(Path(tmp), plan.jpegs)
            _say(f"suite: {plan.jpegs} generated 500x375 JPEGs in {data}")
        precision = chosen[-1] if device.type == "cuda" else "fp32"
        batch = plan.train_batch_sizes[-1]
        for backend in pipelines:
            model = MODELS[plan.pipeline_model]
            result = measure_point(model, "train", precision, batch, plan, args.device, backend=backend, data=data)
            result["data"] = "generated JPEGs" if args.data is None else str(args.data)
            record(point_name("train", model.name, precision, batch, backend, result["image_size"]), result)

        if plan.ratios:
            from benchmarks import ratios

            for name, measure in ratios.plan_ratios(device, data, quick=args.quick).items():
                result = measure()
                path = _write(out, name, result, environment(device), command)
                written.append(path)
                _say(f"  {name}: {ratios.summary(result)}  [{time.perf_counter() - start:.0f} s]")
    _say(f"suite: {len(written)} files in {time.perf_counter() - start:.0f} s")
    return written


def main(argv: list[str] | None = None) -> None:
    try:
        plan, args = parse_args(argv)
        run(plan, args)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
