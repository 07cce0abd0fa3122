"""``convnets benchmark --mode formats``: one trained checkpoint in every format this machine can run, each timed
at every batch size (warm-up iterations first, then timed ones: throughput and latency percentiles of one batch)
and its top-1 measured on DATA's validation images through ``evaluate``'s preprocessing and counting. One table on
stdout, one JSON file; the formats that cannot run here are listed with the reason."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_write_text
from common.benchmark import device_name
from common.config import BenchmarkConfig
from common.distributed import resolve_device
from common.errors import UserError
from common.formats.runners import FORMATS, Format, Runner, Subject, Unavailable
from common.serving.accuracy import eval_loader, labelled_images, top1
from common.telemetry import run_environment

log = logging.getLogger("convnets")

PERCENTILES = (50, 90, 99)
RESULT_VERSION = 1


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes takes whole numbers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes must list batch sizes of at least 1, got {text!r}")
    return sorted(set(sizes))


def selected_formats(text: str | None) -> list[Format]:
    if not text:
        return list(FORMATS.values())
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise UserError(f"--formats: unknown {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    return [FORMATS[n] for n in names]


def format_list() -> str:
    return "\n".join(f"{f.name:<18} {f.precision:<5} {f.device:<5} {f.description}" for f in FORMATS.values())


def _subject(cfg: BenchmarkConfig, device: torch.device, max_batch: int) -> Subject:
    from common.serving.export import load_checkpoint_model
    from common.serving.quantize import calibration_images

    model, meta = load_checkpoint_model(cfg.checkpoint, torch.device("cpu"))
    if meta.multilabel:
        raise UserError(f"--mode formats measures top-1: {cfg.checkpoint} is a multi-label checkpoint")
    model = model.to(memory_format=torch.contiguous_format)
    subject = Subject(model, meta, device, max(2, max_batch), torch.get_num_threads())
    train = Path(cfg.data) / "train"
    if cfg.calibration_images < 1:
        raise UserError(f"--calibration-images must be at least 1, got {cfg.calibration_images}")
    if train.is_dir():
        subject.calibration = calibration_images(train, cfg.calibration_images)
    else:
        subject.calibration_missing = f"no {train} folder: the INT8 formats calibrate on training images"
    return subject


def _inputs(loader, batch: int) -> torch.Tensor:
    """The first ``batch`` validation images (repeated when there are fewer): every format is timed on these pixels."""
    x = next(iter(loader))[0]
    return x.repeat(-(-batch // len(x)), 1, 1, 1)[:batch].contiguous()


def time_batches(run: Runner, x: torch.Tensor, warmup: int, iterations: int) -> dict:
    """``warmup`` untimed calls, then ``iterations`` timed ones, each one whole batch (the runners return host
    arrays, so a GPU format's time ends when its answer is back)."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    latency = np.array(times) * 1000
    return {
        "throughput_img_s": len(x) * iterations / float(np.sum(times)),
        "latency_ms": {f"p{q}": float(np.percentile(latency, q)) for q in PERCENTILES}
        | {"mean": float(latency.mean())},
        "iterations": iterations,
    }


def measure(fmt: Format, subject: Subject, inputs: torch.Tensor, loader, batch_sizes: list[int],
            cfg: BenchmarkConfig) -> dict:  # fmt: skip
    """One format: built, timed at each batch size on the first images of ``inputs``, then its top-1 over
    ``loader``; raises Unavailable or the format's own error."""
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    run = fmt.build(subject)
    built = time.perf_counter() - started
    by_batch = {}
    for batch in batch_sizes:
        by_batch[str(batch)] = time_batches(run, inputs[:batch].contiguous(), cfg.warmup, cfg.iterations)
    result = top1(run, loader, subject.meta)
    device = subject.device.type if fmt.device == "auto" else fmt.device
    return {"precision": fmt.precision, "device": device, "description": fmt.description, "top1": result.top1,
            "top5": result.top5, "eval_images": result.count, "build_s": built, "loadavg_before": load_before,
            "by_batch_size": by_batch}  # fmt: skip


def _versions() -> dict:
    found = {}
    for name in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "openvino", "tensorrt"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def run_formats(cfg: BenchmarkConfig) -> dict:
    """Measure every selected format; print the table, write the JSON file, and return the result."""
    if cfg.formats == "list":
        print(format_list())
        return {}
    if not cfg.checkpoint:
        raise UserError("--mode formats needs --checkpoint FILE (a training checkpoint)")
    if not cfg.data:
        raise UserError("--mode formats needs --data DIR (top-1 on DIR/val, INT8 calibration on DIR/train)")
    batch_sizes, formats = parse_batch_sizes(cfg.batch_sizes), selected_formats(cfg.formats)
    device = resolve_device(cfg.device)
    subject = _subject(cfg, device, max(batch_sizes))
    images = labelled_images(cfg.data, subject.meta)
    loader = eval_loader(images, subject.meta, max(batch_sizes), cfg.workers)
    path = Path(cfg.json or f"formats_{subject.meta.arch}.json")
    if not cfg.json:
        log.info("results go to %s (no --json given)", path)
    inputs = _inputs(loader, max(batch_sizes))
    measured, unavailable = {}, {}
    for fmt in formats:
        log.info("%s: %s", fmt.name, fmt.description)
        try:
            measured[fmt.name] = measure(fmt, subject, inputs, loader, batch_sizes, cfg)
        except Unavailable as e:
            unavailable[fmt.name] = str(e)
        except Exception as e:  # noqa: BLE001 - a format failing here (a compiler missing, an op unsupported) is a result
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            unavailable[fmt.name] = f"failed: {type(e).__name__}: {reason}"
        if fmt.name in unavailable:
            log.info("%s: not measured: %s", fmt.name, unavailable[fmt.name])
        gc.collect()  # the runner and its compiled graph go before the next format is built
    result = {
        "kind": "formats",
        "version": RESULT_VERSION,
        "arch": subject.meta.arch,
        "checkpoint": str(cfg.checkpoint),
        "data": str(images.root),
        "image_size": subject.meta.image_size,
        "classes": len(subject.meta.classes),
        "batch_sizes": batch_sizes,
        "warmup": cfg.warmup,
        "iterations": cfg.iterations,
        "threads": subject.threads,
        "calibration_images": len(subject.calibration) if subject.calibration else 0,
        "device": device_name(device),
        "versions": _versions(),
        "environment": run_environment(),
        "command": shlex.join(["convnets", *sys.argv[1:]]),
        "args": dataclasses.asdict(cfg),
        "formats": measured,
        "unavailable": unavailable,
    }
    atomic_write_text(path, json.dumps(result, indent=2))
    print(table(result))
    log.info("wrote %s", path)
    return result


def table(result: dict) -> str:
    """The result as a plain-text table: one row per format and batch size, then what could not run and why."""
    head = f"{'format':<18} {'precision':<9} {'device':<6} {'top-1':>7} {'batch':>5} {'img/s':>10} " + " ".join(
        f"{'p' + str(q) + ' ms':>9}" for q in PERCENTILES
    )
    lines = [f"{result['arch']} on {result['device']}, top-1 on {result['data']}", head, "-" * len(head)]
    for name, f in result["formats"].items():
        for i, (batch, t) in enumerate(f["by_batch_size"].items()):
            lead = f"{name:<18} {f['precision']:<9} {f['device']:<6} {f['top1']:>6.2f}%" if i == 0 else " " * 43
            lines.append(f"{lead} {batch:>5} {t['throughput_img_s']:>10,.1f} "
                         + " ".join(f"{t['latency_ms'][f'p{q}']:>9.2f}" for q in PERCENTILES))  # fmt: skip
    if result["unavailable"]:
        lines += ["", "not measured here:"] + [f"  {name}: {why}" for name, why in result["unavailable"].items()]
    return "\n".join(lines)
