"""Our KServe v2 server with dynamic batching, the same server at --max-batch-size 1, and LitServe with the same
batch settings, serving the same model on one machine in one run, under the same concurrent tritonclient load.

    python benchmarks/serve_compare.py [--checkpoint C] [--clients 16] [--seconds 10] [--max-batch-size 16]

Without --checkpoint a resnet18 with 4 classes at 32x32 (untrained: speed does not depend on the weights) is
written to a temporary folder. Every request carries one input, of each kind in turn (--payload image|tensor|both):
a 48x48 PNG file as a BYTES element, which each server decodes and preprocesses as `evaluate` does, or a
preprocessed FP32 [1,3,S,S] tensor; the answer is its probabilities. Our server gets what tritonclient sends by
default: both kinds in Triton's binary extension (the PNG file's own bytes, the tensor's raw floats); LitServe reads
only JSON bodies, so it gets both as JSON (the PNG base64-encoded). Each server runs in its own process, one after
another; the clients are threads of this process, each with its own tritonclient connection. LitServe runs as many
worker processes as our server has model instances (--instances, default 2), each on as many torch threads as one
of our instances: the same parallelism on both sides.

Beside requests per second, p50/p99 latency and mean batch sizes, each run records the CPU seconds per request of
the server (its process group) and of the clients (this process), since both share the machine's cores, and for
our server its efficiency: served requests/s over what its instances could compute, the model's own images/s (a
plain forward pass on the server's threads, timed in this process with the server stopped) at the mean batch size
it served, times the instances. Writes everything, with the ratios, the load
average and the versions, to benchmarks/results/<device>/serve_compare.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.checkpoint import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# LitServe side: the same model and the same KServe v2 JSON in and out, batched by LitServe's own batcher.
LITSERVE_APP = r"""
import sys, numpy as np, torch, litserve as ls
sys.path.insert(0, sys.argv[4])
import base64
from common.serving.export import load_checkpoint_model
from common.serving.model import ImageDecoder

class Classifier(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(int(sys.argv[6]))
        self.model, self.meta = load_checkpoint_model(sys.argv[1], torch.device("cpu"))
        self.decode = ImageDecoder(self.meta, 40_000_000)

    def decode_request(self, request):
        tensor = request["inputs"][0]
        if tensor["datatype"] == "BYTES":
            return np.stack([self.decode(base64.b64decode(b)) for b in tensor["data"]])
        return np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])

    def batch(self, inputs):
        # Batch sizes reach the log so that the report can say how much LitServe batched.
        self.sizes = getattr(self, "sizes", []) + [len(inputs)]
        if len(self.sizes) % 25 == 0:
            print(f"litserve mean batch size {np.mean(self.sizes):.3f} over {len(self.sizes)}", flush=True)
        return np.concatenate(inputs)

    def predict(self, x):
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()

    def unbatch(self, output):
        return [row[None] for row in output]

    def encode_response(self, probs):
        return {"model_name": "m", "model_version": "1", "outputs": [{"name": "probabilities", "datatype": "FP32",
                "shape": list(probs.shape), "data": probs.ravel().tolist()}]}

if __name__ == "__main__":
    api = Classifier(max_batch_size=int(sys.argv[2]), batch_timeout=float(sys.argv[3]) / 1000,
                     api_path="/v2/models/m/infer")
    ls.LitServer(api, accelerator="cpu", workers_per_device=int(sys.argv[5]), timeout=60).run(
        port=int(sys.argv[7]), generate_client_file=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            # LitServe has no KServe health route: its /health answers 200 once the worker is up.
            for path in ("/v2/health/ready", "/health"):
                try:
                    if urllib.request.urlopen(f"http://{url}{path}", timeout=2).status == 200:
                        return
                except urllib.error.HTTPError:
                    pass
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready after 180 s:\n{log.read_text()}")


def load(url: str, model: str, size: int, clients: int, seconds: float, warmup: float, payload: str,
         binary: bool) -> dict:  # fmt: skip
    """``clients`` threads sending one request after another; latencies of those that start after the warmup.
    ``binary``: tensors and outputs in Triton's binary extension (tritonclient's default) instead of JSON."""
    import tritonclient.http as httpclient

    if payload == "tensor":
        x, name, dtype = (
            np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32),
            "input",
            "FP32",
        )
    else:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
        # Triton's binary extension carries the file's own bytes; JSON carries them base64-encoded.
        element = buffer.getvalue() if binary else base64.b64encode(buffer.getvalue()).decode()
        x, name, dtype = np.array([element], dtype=np.object_), "image", "BYTES"
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    answered = [0] * clients
    errors: list[str] = []

    def client(i: int) -> None:
        c = httpclient.InferenceServerClient(url, network_timeout=120)
        inp = httpclient.InferInput(name, list(x.shape), dtype)
        inp.set_data_from_numpy(x, binary_data=binary)
        out = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
        while (t0 := time.perf_counter()) < stop_at:
            try:
                c.infer(model, [inp], outputs=out).as_numpy("probabilities")
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e)[:200])
                continue
            answered[i] += 1
            if t0 >= measure_from:
                latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = sorted(v for per in latencies for v in per)
    return {
        "binary": binary,
        "answered": sum(answered),
        "requests": len(flat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "requests_per_s": len(flat) / seconds,
        "p50_ms": 1000 * statistics.median(flat) if flat else None,
        "p99_ms": 1000 * flat[min(len(flat) - 1, int(0.99 * len(flat)))] if flat else None,
    }


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in group ``pgid`` (a server and its workers)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ..., utime (12), stime (13)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def model_images_per_s(checkpoint: str, batch: int, threads: int, seconds: float = 3.0) -> float:
    """The served network's own throughput at ``batch``: forward passes in this process on ``threads`` threads, as
    the server runs them (with no server or client running)."""
    import torch

    from common.serving.export import load_checkpoint_model

    model, meta = load_checkpoint_model(checkpoint, torch.device("cpu"))
    x = torch.randn(batch, 3, meta.image_size, meta.image_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            start, runs = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                model(x)
                runs += 1
    finally:
        torch.set_num_threads(before)
    return batch * runs / (time.perf_counter() - start)


def served_config(serve_args: list[str]):
    """Our server's configuration with ``serve_args``, read by the `serve` command's own options (its model threads
    and instances, defaults included)."""
    from common import config
    from common.serving.config import ServeConfig

    parser = argparse.ArgumentParser(prog="--serve-args")
    config.add_arguments(parser, ServeConfig)
    typed = vars(parser.parse_args(["--checkpoint", "-", *serve_args]))  # only what was typed: defaults suppressed
    return config.resolve(ServeConfig, typed)


def mean_batch(url: str) -> float | None:
    text = urllib.request.urlopen(f"http://{url}/metrics").read().decode()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("convnets_batch_size_sum", "convnets_batch_size_count"))}  # fmt: skip
    count = values.get("convnets_batch_size_count", 0)
    return values.get("convnets_batch_size_sum", 0) / count if count else None


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group, then SIGKILL what is left: LitServe's API-server and inference
    worker processes outlive their parent, and idle ones would still load the machine for the next server."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_one(name: str, command: list[str], model: str, args, workdir: Path, payload: str) -> dict:
    port = free_port()
    log = workdir / f"{name}_{payload}.log"
    proc = subprocess.Popen(command + [str(port)] if name == "litserve" else command + ["--port", str(port)],
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        print(f"{name}: ready, {args.clients} clients sending {payload}s for {args.warmup:g} + {args.seconds:g} s",
              flush=True)  # fmt: skip
        server_cpu, client_cpu = group_cpu_seconds(proc.pid), time.process_time()
        result = load(url, model, args.image_size, args.clients, args.seconds, args.warmup, payload,
                      binary=name != "litserve")  # fmt: skip
        # Over the whole load (warmup included), per request answered in it.
        answered = result.pop("answered")
        result["server_cpu_ms_per_request"] = 1000 * (group_cpu_seconds(proc.pid) - server_cpu) / max(1, answered)
        result["client_cpu_ms_per_request"] = 1000 * (time.process_time() - client_cpu) / max(1, answered)
        if name != "litserve":
            result["mean_batch_size"] = mean_batch(url)
        else:
            lines = [line for line in log.read_text().splitlines() if line.startswith("litserve mean batch size")]
            result["mean_batch_size"] = float(lines[-1].split()[4]) if lines else None
    finally:
        stop_group(proc)
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="training checkpoint (default: an untrained resnet18, 4 classes, 32x32)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--payload", choices=("image", "tensor", "both"), default="both", help="what a request carries")
    p.add_argument("--serve-args", default="", help="more options for our server, e.g. '--threads 2'")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>/serve_compare.json")
    args = p.parse_args()
    # The servers' logs (and the untrained checkpoint) live here while the servers run; they are kept only when
    # something fails, for the reader of the error.
    workdir = Path(tempfile.mkdtemp(prefix="serve_compare_"))
    try:
        compare(args, workdir)
    except BaseException:
        print(f"serve_compare: the servers' logs are kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)


def compare(args: argparse.Namespace, workdir: Path) -> None:
    import torch

    from common.benchmark import device_name
    from common.serving.export import load_checkpoint_model

    checkpoint = args.checkpoint or str(make_checkpoint(workdir / "resnet18.pt"))
    _, meta = load_checkpoint_model(checkpoint, torch.device("cpu"))
    args.image_size = meta.image_size
    ours = [sys.executable, "-m", "common", "serve", "--checkpoint", checkpoint, "--model-name", "m",
            "--max-queue-delay-ms", str(args.max_queue_delay_ms), *args.serve_args.split()]  # fmt: skip
    (workdir / "litserve_app.py").write_text(LITSERVE_APP)
    served = served_config(args.serve_args.split())
    threads, instances = served.model_threads, served.instances
    # argv: checkpoint, max batch size, batch timeout (ms), repository root, worker processes and each one's torch
    # threads (as many as our server's model instances and threads: the same parallelism on both sides; LitServe's
    # workers left at torch's default of all cores each ran 47 image requests/s here, 5x fewer than ours, from
    # oversubscribed cores); run_one appends the port.
    lit = [sys.executable, str(workdir / "litserve_app.py"), checkpoint, str(args.max_batch_size),
           str(args.max_queue_delay_ms), str(ROOT), str(instances), str(threads)]  # fmt: skip
    load_before = os.getloadavg()
    servers = {
        "ours_dynamic_batching": ours + ["--max-batch-size", str(args.max_batch_size)],
        "ours_batch_size_1": ours + ["--max-batch-size", "1"],
        "litserve": lit,
    }
    payloads = ("image", "tensor") if args.payload == "both" else (args.payload,)
    results, ratios = {}, {}
    for payload in payloads:
        results[payload] = {
            name: run_one(name, command, "m", args, workdir, payload) for name, command in servers.items()
        }
        for name in ("ours_dynamic_batching", "ours_batch_size_1"):
            r = results[payload][name]
            batch = max(1, round(r["mean_batch_size"] or 1))
            r["model_images_per_s_at_mean_batch"] = model_images_per_s(checkpoint, batch, threads)
            # What the instances could serve if each had its threads to itself (on 2 cores they do not).
            r["efficiency"] = r["requests_per_s"] / (instances * r["model_images_per_s_at_mean_batch"])
        rps = {k: v["requests_per_s"] for k, v in results[payload].items()}
        ratios[payload] = {
            "dynamic_batching_over_batch_size_1": rps["ours_dynamic_batching"] / rps["ours_batch_size_1"],
            "ours_over_litserve": rps["ours_dynamic_batching"] / rps["litserve"],
            "efficiency_dynamic_batching": results[payload]["ours_dynamic_batching"]["efficiency"],
            "efficiency_batch_size_1": results[payload]["ours_batch_size_1"]["efficiency"],
        }
    load_after = os.getloadavg()
    report = {
        "what": "requests/s, latency, CPU per request and efficiency under concurrent tritonclient load, one input "
        "per request: an encoded image or a preprocessed tensor",
        "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
        "device": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "note": "shared machine: other jobs ran at the same time (see the load averages); numbers are noisy",
        "model": {
            "arch": meta.arch,
            "image_size": meta.image_size,
            "classes": len(meta.classes),
            "checkpoint": args.checkpoint or "untrained, written by this script",
        },  # fmt: skip
        "settings": {
            "payload": args.payload,
            "clients": args.clients,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.max_queue_delay_ms,
            "serve_args": args.serve_args,
            "model_threads": threads,
            "model_instances": instances,
        },  # fmt: skip
        "results": results,
        "ratios": ratios,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **_versions()},
    }
    out = args.out or RESULTS / ("cuda" if torch.cuda.is_available() else "cpu") / "serve_compare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out}")


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("fastapi", "uvicorn", "litserve", "tritonclient", "onnxruntime")}


def make_checkpoint(path: Path) -> Path:
    import torch

    from common.builders import build_model
    from common.registry import get_model_spec

    torch.manual_seed(0)
    model = build_model(get_model_spec("resnet18"), 4)
    config = {"arch": "resnet18", "num_classes": 4, "width_mult": None, "image_size": 32, "val_resize": 36,
              "memory_format": "contiguous", "freeze_backbone": False}  # fmt: skip
    torch.save({"arch": "resnet18", "model": model.state_dict(), "config": config,
                "class_names": ["blue", "green", "red", "yellow"]}, path)  # fmt: skip
    return path


if __name__ == "__main__":
    main()
