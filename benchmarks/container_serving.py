"""Serving throughput of the full and the slim image on the same model and the same clients.

    python benchmarks/container_serving.py --checkpoint runs/q/best.pt --export runs/q/onnx \
        --image convnets:test --serve-image convnets-serve:test --out benchmarks/results/cpu/container_serving.json

Each server runs in a container with the chart's security context and host networking (one at a time, OMP and
decoding threads at their defaults); ``--clients`` tritonclient threads send one PNG each per request for
``--seconds`` after a warm-up, every row once per round (``--rounds``, the order rotated), each row's median
round reported. Rows: the full image with the torch runtime on the checkpoint, the full image with
ONNX Runtime on the export, the slim image (ONNX Runtime, no torch) on the export. Needs DOCKER_HOST set."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.atomic import atomic_write_text  # noqa: E402  (torch-free)

SECURE = ["--read-only", "--cap-drop", "ALL", "--user", "10001:10001", "--security-opt", "no-new-privileges",
          "--tmpfs", "/tmp:rw,size=256m", "--network", "host"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def load(url: str, model: str, clients: int, seconds: float) -> dict:
    """Requests per second and latency percentiles of ``clients`` threads sending for ``seconds``."""
    body = np.array([png(0)], dtype=np.object_)
    latencies: list[float] = []
    stop = threading.Event()

    def client() -> None:
        c = httpclient.InferenceServerClient(url)
        inp = httpclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(body, binary_data=True)
        while not stop.is_set():
            started = time.perf_counter()
            c.infer(model, [inp])
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2)  # warm-up, not counted
    latencies.clear()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "requests_per_s": round(len(ms) / seconds, 1),
            "latency_p50_ms": round(float(np.percentile(ms, 50)), 2),
            "latency_p99_ms": round(float(np.percentile(ms, 99)), 2)}  # fmt: skip


def median_run(runs: list[dict]) -> dict:
    """The run with the median requests/s (the lower middle one of an even count), and every round's figure."""
    ordered = sorted(runs, key=lambda run: run["requests_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "requests_per_s_rounds": [run["requests_per_s"] for run in runs]}


def serve_and_load(image: str, mounts: list[str], command: list[str], model: str, args) -> dict:
    port = free_port()
    name = f"convnets-bench-{port}"
    argv = ["docker", "run", "-d", "--name", name, *SECURE, *mounts, "-e", f"SERVE_PORT={port}", image,
            *(c.replace("PORT", str(port)) for c in command)]  # fmt: skip
    started = subprocess.run(argv, capture_output=True, text=True)
    if started.returncode != 0:
        raise SystemExit(f"docker run {image} failed ({started.returncode}): {started.stderr.strip()}")
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                assert time.time() < deadline, subprocess.run(["docker", "logs", name], capture_output=True).stderr
                time.sleep(0.5)
        return load(f"127.0.0.1:{port}", model, args.clients, args.seconds)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--export", type=Path, required=True, help="a `convnets export --format onnx` folder")
    p.add_argument("--image", default="convnets:test")
    p.add_argument("--serve-image", default="convnets-serve:test")
    p.add_argument("--model", default="resnet18", help="the model name (the checkpoint's arch)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="every row once per round, the order rotated each round; each row's median is reported",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    ckpt = ["-v", f"{args.checkpoint.resolve().parent}:/models:ro"]
    export = ["-v", f"{args.export.resolve()}:/models:ro"]
    serve = ["convnets", "serve", "--host", "127.0.0.1", "--port", "PORT"]
    rows = {
        "full image, torch runtime, checkpoint": (args.image, ckpt, [*serve, "--checkpoint",
                                                                     f"/models/{args.checkpoint.name}"]),
        "full image, onnxruntime, export": (args.image, export, [*serve, "--runtime", "onnxruntime",
                                                                 "--model-dir", "/models"]),
        "slim image, onnxruntime, export": (args.serve_image, export, []),
    }  # fmt: skip
    # Rounds in rotated order, medians: with one fixed order a row that always runs last cannot be told from the
    # machine warming up or loading during the run.
    labels, load_before = list(rows), os.getloadavg()
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for r in range(args.rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            image, mounts, command = rows[label]
            runs[label].append(serve_and_load(image, mounts, command, args.model, args))
            print(f"round {r + 1}:", label, json.dumps(runs[label][-1]), flush=True)
    results = {label: median_run(runs[label]) for label in labels}
    sizes = {i: int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", i], capture_output=True,
                                   text=True, check=True).stdout) for i in (args.image, args.serve_image)}  # fmt: skip
    report = {"clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
              "request": "one 64x64 PNG (binary tensor)",
              "results": results, "runs": runs, "image_size_bytes": sizes,
              "server": "convnets serve's defaults (model instances, threads, batching)",
              "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg()}}  # fmt: skip
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
