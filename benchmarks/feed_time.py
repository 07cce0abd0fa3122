"""Feeding cost of the DALI backend on ImageNet-sized JPEGs, as one command.

(a) The training thread's own time per batch spent on feeding, two ways: CPU time of the consumer thread inside
    ``next(iterator)`` (``time.thread_time``, so time spent idle-waiting for DALI is excluded; the feeder's
    file reads in the old design ran in a thread pool and are not in it), and the wall time of the feeder's
    callback called directly (the old design ran it on the training thread, the new one in DALI's workers).
    Measured for this checkout and, with ``--old PATH``, for another checkout (e.g.
    ``git worktree add /tmp/old 15d13c7``).
(b) ``convnets benchmark --mode data`` throughput for ``dali-cpu`` with ``--workers 1`` and ``--workers 2`` (for
    both checkouts with ``--old``).

    python benchmarks/feed_time.py --old /tmp/old

Writes ``benchmarks/results/cpu/feed_time.json`` with the commands, machine, versions and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# Runs inside a subprocess whose PYTHONPATH is the checkout under test: only APIs both versions share,
# plus the start-up scan's sizes where this version has them (as training gets them).
CONSUMER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from common import data
    root, epochs, pause, workers = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    images = data.scan_split(root + "/train")
    if hasattr(data, "check_files"):
        (images,) = data.drop_bad_images([images], "header", False, workers)
    spec = data.PipelineSpec(image_size=224, resize_size=256, batch_size=256, workers=workers)
    loader = data.build_loader("dali-cpu", images, spec, True, torch.device("cpu"))
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        it = iter(loader)
        cpu, wall = [], []
        while True:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                next(it)
            except StopIteration:
                break
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - t0)
            time.sleep(pause)
        out.append({"epoch": epoch, "thread_cpu_ms": [1000 * c for c in cpu], "wall_ms": [1000 * w for w in wall]})
    # The feeder's own work per batch, called directly: the old design ran it on the training thread (file reads,
    # header parses in the first epoch, crop windows), the new one runs it in DALI's worker processes.
    callback = []
    if hasattr(data, "_DaliSource"):
        source = data._DaliSource(images, spec, True, data.shard_indices(len(images), spec, True, 0, 1))
        call = lambda epoch, i: source()
        start = lambda epoch: source.set_epoch(epoch)
    else:
        from common.data.dali_loader import DaliBatchSource
        from types import SimpleNamespace
        source = DaliBatchSource(images, spec, True, data.shard_indices(len(images), spec, True, 0, 1), 0)
        call = lambda epoch, i: source(SimpleNamespace(epoch_idx=epoch, iteration=i))
        start = lambda epoch: None
    for epoch in range(epochs):
        start(epoch)
        times = []
        for i in range(len(images) // 256):
            t0 = time.perf_counter()
            call(epoch, i)
            times.append(1000 * (time.perf_counter() - t0))
        callback.append({"epoch": epoch, "wall_ms": times})
    print("RESULT " + json.dumps({"next": out, "callback": callback}))
    """
)


def source_photos(rng: np.random.Generator, n: int = 4) -> list[np.ndarray]:
    """Photo-like 1000x750 images: skimage's sample photos when installed, else smooth gradients with shapes
    and sensor noise (JPEG sizes and decode times depend on such texture)."""
    try:
        from skimage import data as skdata

        photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
        from PIL import Image

        return [np.asarray(Image.fromarray(p).resize((1000, 750))) for p in photos[:n]]
    except ImportError:
        pass
    from PIL import Image, ImageDraw, ImageFilter

    photos = []
    yy, xx = np.mgrid[0:750, 0:1000] / 1000.0
    for _ in range(n):
        base = np.stack([np.sin(xx * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)], -1)
        base = (base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (750, 1000, 3))
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(40):
            x, y = rng.integers(0, 1000), rng.integers(0, 750)
            r = int(rng.integers(10, 120))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im = im.filter(ImageFilter.GaussianBlur(1.2))
        noisy = np.asarray(im, dtype=np.float64) + rng.normal(0, 6, (750, 1000, 3))
        photos.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return photos


def make_data(root: Path, n_train: int, classes: int = 4) -> Path:
    """ImageNet-like JPEGs (about 500x375, varied crops and qualities) in ``root/{train,val}/<class>/``."""
    from PIL import Image

    marker = root / f".complete-{n_train}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    photos = source_photos(rng)
    for split, n in (("train", n_train), ("val", 64)):
        for i in range(n):
            photo = photos[i % len(photos)]
            w, h = int(rng.integers(400, 1000)), int(rng.integers(300, 750))
            x, y = int(rng.integers(0, 1000 - w + 1)), int(rng.integers(0, 750 - h + 1))
            size = (500, 375) if rng.random() < 0.7 else (int(rng.integers(333, 500)), int(rng.integers(333, 500)))
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[y : y + h, x : x + w]).resize(size).save(
                folder / f"{i:06d}.jpg", quality=int(rng.integers(75, 96))
            )
    marker.touch()
    return root


def consumer_time(checkout: Path, data: Path, epochs: int, pause: float, workers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run([sys.executable, "-c", CONSUMER, str(data), str(epochs), str(pause), str(workers)],
                          env=env, cwd=checkout, capture_output=True, text=True, timeout=1800)  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"consumer run in {checkout} failed:\n{proc.stderr[-3000:]}")
    found = json.loads(line[len("RESULT ") :])
    epochs_out = found["next"]
    for e in epochs_out:
        # The first batch of an epoch waits for the pipeline to start and the last two find nothing left to
        # schedule: the batches between are what a step pays.
        steady = e["thread_cpu_ms"][1:-2] or e["thread_cpu_ms"]
        e["thread_cpu_ms_median"] = float(np.median(steady))
        e["wall_ms_median"] = float(np.median(e["wall_ms"][1:-2] or e["wall_ms"]))
    for e in found["callback"]:
        e["wall_ms_median"] = float(np.median(e["wall_ms"]))
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    return {"checkout": str(checkout), "commit": commit, "epochs": epochs_out, "feeder_callback": found["callback"]}


def data_throughput(checkout: Path, data: Path, workers: int, iterations: int, warmup: int) -> dict:
    out = data / f".bench-{checkout.name}-w{workers}.json"
    cmd = ["convnets", "benchmark", "--mode", "data", "--data", str(data), "--data-backend", "dali-cpu",
           "--workers", str(workers), "--batch-size", "256", "--iterations", str(iterations),
           "--warmup", str(warmup), "--image-check", "none", "--json", str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(checkout))
    subprocess.run([sys.executable, "-m", "common", *cmd[1:]], cwd=checkout, env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    return {"command": " ".join(cmd), "checkout": str(checkout), "workers": workers,
            "throughput_img_s": result["throughput_img_s"], "latency_ms": result["latency_ms"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, help="a checkout of the feeder to compare with (e.g. commit 15d13c7)")
    p.add_argument("--data", type=Path, default=Path("/tmp/convnets-feed-bench"), help="generated JPEGs go here")
    p.add_argument("--train-images", type=int, default=2048, help="training JPEGs (256 per batch)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per consumer run (the old feeder's first differs)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds after each batch, standing in for a step")
    p.add_argument("--workers", type=int, default=2, help="DALI threads for the consumer runs")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "cpu" / "feed_time.json")
    args = p.parse_args()

    import torch
    from nvidia import dali

    from common.benchmark import device_name

    data = make_data(args.data, args.train_images)
    load_before = os.getloadavg()
    started = time.time()
    feeders = {"new": consumer_time(REPO, data, args.epochs, args.pause, args.workers)}
    if args.old:
        feeders["old"] = consumer_time(args.old.resolve(), data, args.epochs, args.pause, args.workers)
    checkouts = {"new": REPO} | ({"old": args.old.resolve()} if args.old else {})
    throughput = [
        data_throughput(path, data, w, args.iterations, args.warmup) | {"feeder": name}
        for name, path in checkouts.items()
        for w in (1, 2)
    ]
    result = {
        "command": "python benchmarks/feed_time.py " + " ".join(sys.argv[1:]),
        "what": "training thread CPU ms per batch of 256 inside next(iterator) (median over steady batches), "
        "and convnets benchmark --mode data throughput for dali-cpu",
        "data": {
            "train_images": args.train_images,
            "size": "about 500x375 JPEG, quality 75-95",
            "generator": "skimage photos" if "skimage" in sys.modules else "PIL-drawn",
        },  # fmt: skip
        "feeders": feeders,
        "summary_thread_cpu_ms_per_batch": {
            name: [e["thread_cpu_ms_median"] for e in f["epochs"]] for name, f in feeders.items()
        },
        "summary_feeder_callback_wall_ms_per_batch": {
            name: [e["wall_ms_median"] for e in f["feeder_callback"]] for name, f in feeders.items()
        },
        "where_the_callback_runs": {"old": "training thread", "new": "DALI worker processes"},
        "data_mode_throughput": throughput,
        "machine": {
            "cpu": device_name(torch.device("cpu")),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },  # fmt: skip
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "dali": dali.__version__},
        "seconds": round(time.time() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(f".{args.json.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.json)
    keys = ("summary_thread_cpu_ms_per_batch", "summary_feeder_callback_wall_ms_per_batch", "machine")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    for t in throughput:
        print(f"{t['feeder']}: dali-cpu --workers {t['workers']}: {t['throughput_img_s']:.0f} img/s")


if __name__ == "__main__":
    main()
