"""Rebuild ``benchmarks/README.md`` and its plots from every stored result under ``benchmarks/results/``.

    python -m benchmarks.report [--results benchmarks/results] [--out benchmarks]

Nothing in the README is typed by hand: tables come from the result files (one folder per device), accuracies from
the training runs' files (``train_*.json``), published numbers from ``references.toml`` (labelled as theirs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from benchmarks.report_formats import formats_section, is_formats_result
from common.checkpoint import atomic_write_text
from common.errors import UserError

HERE = Path(__file__).resolve().parent


@dataclass
class Device:
    """The results of one folder ``results/<slug>/``."""

    slug: str
    label: str = ""
    points: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)  # training runs with accuracy
    ratios: list[dict] = field(default_factory=list)
    formats: list[dict] = field(default_factory=list)  # convnets benchmark --mode formats, one file per model
    gpu: str | None = None


def _precision(r: dict) -> str:
    if r.get("precision"):
        return r["precision"]
    if r.get("amp"):
        return "amp-bf16" if r.get("amp_dtype") == "bfloat16" else "amp-fp16"
    return "fp32"


def _model(r: dict) -> str:
    if r.get("model"):
        return r["model"]
    width = r.get("width_mult")
    return r["arch"] if width in (None, 1.0) else f"{r['arch']}_{width:g}"


def load(results: Path) -> list[Device]:
    """Every device folder under ``results``, its points, training runs and ratios, sorted by folder name."""
    if not results.is_dir():
        raise UserError(f"{results}: no such results folder")
    devices = []
    for folder in sorted(p for p in results.iterdir() if p.is_dir() and p.name != "plots"):
        dev = Device(folder.name)
        for path in sorted(folder.glob("*.json")):
            try:
                r = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not valid JSON ({e})") from e
            r["_file"] = f"results/{folder.name}/{path.name}"
            env = r.get("environment", {})
            if env.get("gpu_name"):
                dev.gpu = env["gpu_name"]
            if is_formats_result(r):
                dev.formats.append(r)
            elif "final_top1" in r:
                dev.runs.append(r)
            elif "throughput_img_s" in r and "mode" in r:
                r["precision"], r["model"] = _precision(r), _model(r)
                r.setdefault("repeats", 1)
                r.setdefault("throughput_img_s_std", None)
                _add_counts(r)
                dev.points.append(r)
            elif "comparison" in r or path.name.startswith("compare_"):
                dev.ratios.append(r)
            if not dev.label and r.get("device"):
                dev.label = r["device"]
        if dev.gpu:
            dev.label = f"{dev.gpu} (GPU)"
        dev.label = dev.label or folder.name
        if dev.points or dev.runs or dev.ratios or dev.formats:
            devices.append(dev)
    return devices


def _add_counts(point: dict) -> None:
    """Params and MACs for result files written before the suite recorded them (the sweep's, compare.py's):
    counted now, on the meta device, from the model the file names."""
    if point.get("macs_per_image_forward"):
        return
    from common.info import count_model

    try:
        counts = count_model(point["arch"], point["image_size"], 1000, point.get("width_mult"))
    except Exception:  # noqa: BLE001 - a model no longer registered: its counts stay unknown
        return
    point["params"] = counts.params
    point["macs_per_image_forward"] = counts.macs
    point["achieved_macs_per_s"] = counts.macs * (3 if point["mode"] == "train" else 1) * point["throughput_img_s"]


def load_references(path: Path = HERE / "references.toml") -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def peak_flops(gpu: str | None, precision: str, refs: dict) -> tuple[float | None, str]:
    """Dense peak FLOP/s of the GPU for the precision, and its source; (None, "unknown peak") for CPUs and GPUs
    not in the table."""
    if not gpu:
        return None, "unknown peak (CPU)"
    key = {"fp32": "fp32", "tf32": "tf32", "amp-fp16": "fp16", "amp-bf16": "fp16"}[precision]
    for peak in refs.get("peak", []):
        if peak["match"].lower() in gpu.lower():
            return peak[key] * 1e12, peak["source"]
    return None, f"unknown peak ({gpu} not in references.toml)"


def mfu(point: dict, gpu: str | None, refs: dict) -> float | None:
    """Achieved multiply-adds per second over the device's peak multiply-adds per second (peak FLOPs / 2)."""
    peak, _ = peak_flops(gpu, point["precision"], refs)
    achieved = point.get("achieved_macs_per_s")
    return achieved / (peak / 2) if peak and achieved else None


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def _img_s(p: dict) -> str:
    std = p.get("throughput_img_s_std")
    return _fmt(p["throughput_img_s"]) + (f" ± {std:,.1f}" if std is not None and p["repeats"] > 1 else "")


def _synthetic(points: list[dict]) -> list[dict]:
    return [p for p in points if p.get("data_backend") == "synthetic" and not p.get("grid")]


def _accuracy(runs: list[dict]) -> dict[str, dict]:
    """Best top-1 per model over the training runs of all devices (the run's file is linked); a run given a target
    stopped at it and is in the time-to-accuracy table instead."""
    best: dict[str, dict] = {}
    for r in runs:
        if r.get("target"):
            continue
        model = _model(r)
        if model not in best or r["final_top1"] > best[model]["final_top1"]:
            best[model] = r
    return best


def summary_table(dev: Device, accuracy: dict[str, dict]) -> list[str]:
    rows = defaultdict(dict)
    for p in _synthetic(dev.points):
        key = (p["model"], p["precision"], p["image_size"])
        slot = rows[key]
        slot.setdefault("params", p.get("params"))
        slot.setdefault("macs", p.get("macs_per_image_forward"))
        if p["throughput_img_s"] > slot.get(p["mode"], {}).get("throughput_img_s", -1):
            slot[p["mode"]] = p
        if p["mode"] == "inference" and p["batch_size"] == 1:
            slot["bs1"] = p
    lines = [
        "| model | precision | size | train img/s (batch) | inference img/s (batch) | latency p99 @ batch 1 (ms) "
        "| top-1 (data set, size) | params (M) | GMACs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (model, precision, size), slot in sorted(rows.items()):
        cells = []
        for mode in ("train", "inference"):
            p = slot.get(mode)
            cells.append(f"[{_img_s(p)}]({p['_file']}) ({p['batch_size']})" if p else "—")
        bs1 = slot.get("bs1")
        run = accuracy.get(model)
        acc = f"[{run['final_top1']:.2f}%]({run['_file']}) ({_dataset(run)}, {run['image_size']} px)" if run else "—"
        params = f"{slot['params'] / 1e6:.2f}" if slot.get("params") else "—"
        macs = f"{slot['macs'] / 1e9:.3f}" if slot.get("macs") else "—"
        lines.append(f"| {model} | {precision} | {size} | {cells[0]} | {cells[1]} | "
                     f"{_fmt(bs1['latency_ms']['p99']) if bs1 else '—'} | {acc} | {params} | {macs} |")  # fmt: skip
    return lines


def time_to_accuracy_table(devices: list[Device]) -> list[str]:
    """Training runs that had a target (``--target-top1``/``--target-map``): the epoch and seconds to reach it."""
    rows = [(dev, r) for dev in devices for r in dev.runs if r.get("target")]
    if not rows:
        return []
    lines = [
        "## Time to accuracy",
        "",
        "Training runs given a target (`--target-top1 X` or `--target-map X`): they stop at the first evaluation "
        "that reaches it. Seconds are the epoch loop's (training and evaluation, summed over a resumed run's "
        "attempts), MLPerf's measure; the whole command's wall time, start-up included, beside them.",
        "",
        "| model | data set, size | target | reached at epoch | seconds to target | wall s | device | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dev, r in sorted(rows, key=lambda x: (x[0].slug, x[1]["_file"])):
        t = r["target"]
        lines.append(f"| {_model(r)} | {_dataset(r)}, {r['image_size']} px | {t['metric']} {t['value']:g}% "
                     f"| {t['epoch']} (of {r['epochs']}) | {t['seconds']:.1f} | {r['wall_seconds']:.0f} | {dev.label} "
                     f"| [{Path(r['_file']).name}]({r['_file']}) |")  # fmt: skip
    return [*lines, ""]


def _dataset(run: dict) -> str:
    data = str(run.get("data", ""))
    return "Fashion-MNIST" if "fashion" in data.lower() else Path(data).name or "?"


def points_table(dev: Device, refs: dict) -> list[str]:
    lines = [
        "| mode | model | precision | size | data | batch | img/s (mean ± std) | repeats x iterations "
        "| p50 ms | p99 ms | MFU | img/s per W | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = sorted(dev.points, key=lambda p: (p["mode"], p["model"], p["precision"], p["image_size"],
                                              p["data_backend"], p["batch_size"]))  # fmt: skip
    for p in order:
        m = mfu(p, dev.gpu, refs)
        power = (p.get("gpu") or {}).get("gpu_power_mean_w")
        per_watt = p["throughput_img_s"] / power if power else None
        load = p.get("loadavg_before")
        lines.append(
            f"| {p['mode']} | {p['model']} | {p['precision']} | {p['image_size']} | {p['data_backend']} | "
            f"{p['batch_size']} | [{_img_s(p)}]({p['_file']}) | {p['repeats']} x {p['iterations']} | "
            f"{_fmt(p['latency_ms']['p50'])} | {_fmt(p['latency_ms']['p99'])} | "
            f"{f'{100 * m:.1f}%' if m is not None else peak_flops(dev.gpu, p['precision'], refs)[1]} | "
            f"{_fmt(per_watt, 2)} | {_fmt(load[0], 2) if load else '—'} |"
        )
    return lines


def ratio_lines(dev: Device) -> list[str]:
    lines = []
    for r in dev.ratios:
        kind = r.get("comparison") or Path(r["_file"]).stem
        if kind == "loaders":
            sides = ", ".join(
                f"{k} {r['img_s_median'][k]:,.0f} img/s ({v:.2f}x)" for k, v in r["ratio_to_baseline"].items()
            )
            lines.append(f"- **Loaders** ({r['workers']} workers, {r['image_size']} px, batch {r['batch_size']}, "
                         f"median of {r['rounds']} interleaved rounds): {sides}. "
                         f"[{r['_file']}]({r['_file']})")  # fmt: skip
        elif kind == "engine_vs_plain_loop":
            verdict = "within" if r["within_limit"] else "OVER"
            lines.append(f"- **Engine vs plain PyTorch loop** ({r['arch']}, {r['image_size']} px, batch "
                         f"{r['batch_size']}, {r.get('setting', {}).get('memory_format', 'channels_last')}): "
                         f"{r['engine_img_s_median']:,.1f} vs "
                         f"{r['plain_img_s_median']:,.1f} img/s, "
                         f"overhead {r['overhead_pct']:+.1f}% ({verdict} the {r['overhead_limit_pct']:g}% limit). "
                         f"[{r['_file']}]({r['_file']})")  # fmt: skip
        elif kind == "inference_backends":
            names = list(next(iter(r["by_batch_size"].values()))["ratio_to_baseline"])
            lines.append(f"- **Inference back ends** ({r['arch']}, {r['image_size']} px, {r['precision']}; "
                         f"img/s, ratio to eager; [{r['_file']}]({r['_file']})):")  # fmt: skip
            lines.append("")
            lines.append("  | batch | " + " | ".join(names) + " |")
            lines.append("  | --- |" + " --- |" * len(names))
            for batch, b in r["by_batch_size"].items():
                cells = [f"{b['img_s_median'][n]:,.0f} ({b['ratio_to_baseline'][n]:.2f}x)" for n in names]
                lines.append(f"  | {batch} | " + " | ".join(cells) + " |")
            if r.get("onnxruntime_providers"):
                lines.append(f"\n  ONNX Runtime providers: {', '.join(r['onnxruntime_providers'])}.")
            if r.get("onnxruntime_error"):
                lines.append(f"\n  ONNX Runtime not measured: {r['onnxruntime_error']}")
            lines.append("")
        elif "ratio" in r:  # benchmarks/compare.py's files
            lines.append(f"- `{Path(r['_file']).name}` (benchmarks/compare.py): ratio {r['ratio']:.2f} "
                         f"({', '.join(k for k in r if k.endswith('_median'))}). "
                         f"[{r['_file']}]({r['_file']})")  # fmt: skip
    return lines


def reference_lines(devices: list[Device], refs: dict, accuracy: dict[str, dict]) -> list[str]:
    lines = [
        "Their numbers on their hardware, beside ours where we measured the same model, mode and precision "
        "(our best over batch sizes, synthetic data). Different hardware: compare the ratio, not the figure.",
        "",
        "| theirs: source | their hardware | model | mode | precision | their img/s | ours (device, batch, size) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ref in refs.get("throughput", []):
        ours = []
        for dev in devices:
            same = [p for p in _synthetic(dev.points) if p["arch"] in (ref["arch"], f"{ref['arch']}_bn")
                    and p.get("width_mult") in (None, 1.0) and p["mode"] == ref["mode"]
                    and p["precision"] == ref["precision"]]  # fmt: skip
            if same:
                p = max(same, key=lambda p: p["throughput_img_s"])
                ours.append(f"[{p['throughput_img_s']:,.0f}]({p['_file']}) ({dev.label}, {p['arch']}, batch "
                            f"{p['batch_size']}, {p['image_size']} px)")  # fmt: skip
        batch = ref["batch_size"] or "?"
        lines.append(f"| [{ref['source']}]({ref['url']}) | {ref['hardware']} | {ref['arch']} | {ref['mode']} | "
                     f"{ref['precision']} (batch {batch}) | {ref['img_s']:,} | "
                     f"{'; '.join(ours) or 'not measured on the same precision'} |")  # fmt: skip
    lines += ["", "| theirs: source | data set | model | their top-1 | ours |", "| --- | --- | --- | --- | --- |"]
    for ref in refs.get("accuracy", []):
        run = accuracy.get(ref["arch"])
        ours = (
            f"[{run['final_top1']:.2f}%]({run['_file']}) ({run['epochs']} epochs, {run['image_size']} px)"
            if run
            else "not measured"
        )
        lines.append(
            f"| [{ref['source']}]({ref['url']}) | {ref['dataset']} | {ref['arch']} | {ref['top1']}% | {ours} |"
        )
    return lines


# ----------------------------------------------------------------------------------------------------------
# Plots


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def _log_axes(ax) -> None:
    """Log scales with plain tick labels (8, 64, 250) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())


def plot_device(dev: Device, plots: Path) -> list[str]:
    """Throughput against batch size (train, inference) and inference latency p50/p99; the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _synthetic(dev.points)
    if not points:
        return []
    written = []
    series = defaultdict(list)
    for p in points:
        series[(p["mode"], p["model"], p["precision"], p["image_size"])].append(p)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, mode in zip(axes, ("train", "inference"), strict=True):
        for (m, model, precision, size), ps in sorted(series.items()):
            if m != mode:
                continue
            ps.sort(key=lambda p: p["batch_size"])
            ax.errorbar([p["batch_size"] for p in ps], [p["throughput_img_s"] for p in ps],
                        yerr=[p["throughput_img_s_std"] or 0 for p in ps], marker="o", capsize=3,
                        label=f"{model} {precision} {size}px")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title=f"{mode} throughput")
        _log_axes(ax)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(dev.label)
    name = f"{dev.slug}_throughput.png"
    _save(fig, plots / name)
    plt.close(fig)
    written.append(name)

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (m, model, precision, size), ps in sorted(series.items()):
        if m != "inference":
            continue
        ps.sort(key=lambda p: p["batch_size"])
        x = [p["batch_size"] for p in ps]
        line = ax.plot(x, [p["latency_ms"]["p50"] for p in ps], marker="o", label=f"{model} {precision} {size}px p50")
        ax.plot(x, [p["latency_ms"]["p99"] for p in ps], marker="x", linestyle="--", color=line[0].get_color(),
                label=f"{model} {precision} {size}px p99")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="latency of one batch (ms)",
           title=f"inference latency p50 (solid) and p99 (dashed): {dev.label}")  # fmt: skip
    _log_axes(ax)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    name = f"{dev.slug}_latency.png"
    _save(fig, plots / name)
    plt.close(fig)
    written.append(name)
    return written


def plot_accuracy(devices: list[Device], refs: dict, plots: Path) -> str | None:
    """Top-1 against throughput: our training runs (accuracy and speed from the same run), and the MobileNet v1
    width x resolution grid (the paper's ImageNet top-1 against our measured inference throughput)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(dev, r) for dev in devices for r in dev.runs if r.get("per_epoch")]
    paper = {(p["width"], p["size"]): p["top1"] for g in refs.get("mobilenet_grid", []) for p in g["points"]}
    grid = [(dev, p) for dev in devices for p in dev.points if p.get("grid") or (
        p["arch"] == "mobilenet_v1" and p["mode"] == "inference")]  # fmt: skip
    grid = [(d, p) for d, p in grid if (p.get("width_mult") or 1.0, p["image_size"]) in paper]
    if not runs and not grid:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    for _, r in runs:
        speed = statistics.fmean(e["train.total_ips"] for e in r["per_epoch"] if "train.total_ips" in e)
        ax.scatter(speed, r["final_top1"], s=40)
        ax.annotate(f"{_model(r)} ({r['epochs']} ep)", (speed, r["final_top1"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set(xscale="log", xlabel="training images / s (whole epochs, same run)", ylabel="top-1 (%)",
           title="ours: Fashion-MNIST, 32 px, " + ", ".join(sorted({d.label for d, _ in runs})))  # fmt: skip
    ax.title.set_fontsize(8)
    ax.grid(True, alpha=0.3)
    _log_axes(ax)
    ax = axes[1]
    by_dev = defaultdict(list)
    for dev, p in grid:
        by_dev[dev.label].append(p)
    for label, ps in by_dev.items():
        best = {}
        for p in ps:  # one point per (width, size): the fastest measured
            key = (p.get("width_mult") or 1.0, p["image_size"])
            if key not in best or p["throughput_img_s"] > best[key]["throughput_img_s"]:
                best[key] = p
        xs = [p["throughput_img_s"] for p in best.values()]
        ys = [paper[k] for k in best]
        ax.scatter(xs, ys, label=label)
        for k, x, y in zip(best, xs, ys, strict=True):
            ax.annotate(f"{k[0]:g}x {k[1]}px", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xscale="log", xlabel="our inference images / s (batch and precision: see the tables)",
           ylabel="ImageNet top-1 (%), the paper's",
           title="MobileNet v1 width x resolution: paper top-1 vs our speed")  # fmt: skip
    ax.title.set_fontsize(8)
    ax.grid(True, alpha=0.3)
    if by_dev:
        ax.legend(fontsize=7)
        _log_axes(ax)
    else:
        ax.text(0.5, 0.5, "no MobileNet v1 grid point measured yet", ha="center", transform=ax.transAxes)
    name = "accuracy_vs_throughput.png"
    _save(fig, plots / name)
    plt.close(fig)
    return name


# ----------------------------------------------------------------------------------------------------------
# The README

HEADER = """# Benchmarks

How fast, on what, compared with what. Everything below is generated by `python -m benchmarks.report` from the
files under `results/<device>/` (written by `bash benchmarks/run.sh`); do not edit this file by hand.
GPU figures are labelled with the GPU's name; a CPU figure is never presented as a GPU one.
"""


def _method(devices: list[Device]) -> list[str]:
    points = [p for d in devices for p in d.points]
    combos = sorted({(p.get("warmup"), p.get("iterations"), p["repeats"]) for p in points}, key=str)
    described = "; ".join(f"{w} warm-up, {i} timed iterations, {r} repeat(s)" for w, i, r in combos)
    return [
        "## Method",
        "",
        f"- Settings found in the results: {described or 'none'}.",
        "- Every point runs the engine's own `run_benchmark` (`convnets benchmark`): the warm-up iterations "
        "(compilation, cuDNN autotuning, loader start-up) are excluded; on a GPU every timed iteration ends with a "
        "synchronisation. Throughput is the mean over the repeats, ± their standard deviation; latencies are one "
        "iteration (one whole batch), percentiles per repeat averaged over repeats.",
        "- Synthetic data: random tensors already on the device (no decoding). The `dali-*` and `pytorch` rows read "
        "generated 500x375 JPEGs through the real pipelines, augmentation included.",
        "- Training MACs are 3x the forward MACs (a backward costs about two forwards). MFU is achieved multiply-adds "
        "per second over the device's dense peak for the precision (`references.toml`, from the vendor datasheets; "
        'AMP rows against the FP16/BF16 peak); CPUs have no peak in the table and say "unknown peak".',
        "- Power, utilisation and clocks come from pynvml, sampled every 0.1 s during the timed part, on NVIDIA GPUs.",
        "- Side-by-side ratios run every side in one process, interleaved round by round, and report medians: "
        "absolute times on shared machines drift, ratios much less. The load average at the start of each point is in "
        "its file (`loadavg_before`) and in the table.",
        "",
        "## Regenerate",
        "",
        "```bash",
        "bash benchmarks/run.sh --quick     # the small subset (under 10 minutes on 2 CPU cores), then this report",
        "bash benchmarks/run.sh             # the full suite (GPU machines, bigger CPUs)",
        "python -m benchmarks.report        # this README and the plots, from the stored results only",
        "```",
        "",
        "Each result file holds its exact command (`command`), resolved arguments (`args`), device, driver and "
        "library versions (`environment`).",
        "",
        "| other results here | command | file |",
        "| --- | --- | --- |",
        "| one recipe's sweep (batch sizes x precisions) | `bash resnet50/benchmark.sh` (also `mobilenet/`, `vgg/`) "
        "| `results/<device>/<arch>_<mode>_<precision>_bs<B>.json` |",
        "| one point | `convnets benchmark --mode train --arch resnet50 --batch-size 256 --amp --json FILE` "
        "| where `--json` says |",
        "| engine vs plain loop, dali-cpu vs ImageFolder + PIL, on a data set | "
        "`python benchmarks/compare.py --data data/fashion-mnist` | `results/<device>/compare_*.json` |",
        "| serving | `python benchmarks/serve_compare.py` | `results/<device>/serve_compare.json` |",
        "| every export format of a trained checkpoint, speed and top-1 | `bash benchmarks/formats_fashion_mnist.sh`, "
        "or `convnets benchmark --mode formats --checkpoint C --data DIR --json FILE` "
        "| `results/<device>/formats_<arch>.json` |",
        "| training runs (accuracy, wall time, RSS per epoch; time to accuracy with a target) | the recipe's "
        "launcher with the profile named in the file's `command`, then `python benchmarks/record_run.py` "
        "| `results/<device>/train_*.json` |",
        "",
        "## On a GPU machine",
        "",
        "```bash",
        "pip install -e '.[dali,bench,test]'          # or: make setup",
        "python -m pytest -q tests/test_gpu.py        # dali-gpu against dali-cpu, AMP, telemetry",
        "bash benchmarks/run.sh --quick               # or the full suite; writes results/<GPU name>/",
        "```",
        "",
        "`nvidia-dali-cuda130` needs an NVIDIA driver for CUDA 13 (580 or newer); with an older driver install "
        "`nvidia-dali-cuda120` instead.",
    ]


def build(results: Path, out: Path) -> Path:
    """Write ``out/README.md`` and ``out/plots/*.png``; return the README's path."""
    refs = load_references()
    devices = load(results)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    accuracy = _accuracy([r for d in devices for r in d.runs])
    lines = [HEADER, "## Devices", ""]
    lines += [f"- `results/{d.slug}/`: {d.label} ({len(d.points)} points, {len(d.ratios)} comparisons, "
              f"{len(d.runs)} training runs{f', {len(d.formats)} formats tables' if d.formats else ''})"
              for d in devices]  # fmt: skip
    for dev in devices:
        if not dev.points:
            continue
        lines += ["", f"## {dev.label} (`results/{dev.slug}/`): summary", "",
                  "Best over batch sizes, synthetic data. Top-1 from this repository's training runs (their data "
                  "set and size in brackets).", ""]  # fmt: skip
        loads = [p["loadavg_before"][0] for p in dev.points if p.get("loadavg_before")]
        cpus = {p.get("cpu_count") or p.get("environment", {}).get("cpu_count") for p in dev.points} - {None}
        if loads:  # a busy shared machine slows every figure; say how busy it was
            lines += [f"1-minute load average when these points started: {min(loads):.1f} to {max(loads):.1f}, on "
                      f"{'/'.join(map(str, sorted(cpus))) or '?'} logical CPUs.", ""]  # fmt: skip
        lines += summary_table(dev, accuracy)
    lines += ["", "## Plots", ""]
    for dev in devices:
        for name in plot_device(dev, plots):
            lines.append(f"![{name}](plots/{name})")
            lines.append("")
    acc_plot = plot_accuracy(devices, refs, plots)
    if acc_plot:
        lines += [f"![accuracy against throughput](plots/{acc_plot})", "",
                  "Left: accuracy and training speed from the same training run. Right: MobileNet v1 over its width "
                  "multiplier and input resolution, the paper's ImageNet top-1 (Howard et al. 2017) against the "
                  "throughput we measured for the same configuration.", ""]  # fmt: skip
    lines += formats_section(devices, plots, _save, _log_axes)
    lines += time_to_accuracy_table(devices)
    lines += ["## Side by side (ratios)", ""]
    for dev in devices:
        if dev.ratios:
            lines += [f"### {dev.label} (`results/{dev.slug}/`)", "", *ratio_lines(dev), ""]
    lines += ["## Published references (theirs)", "", *reference_lines(devices, refs, accuracy), ""]
    for dev in devices:
        if dev.points:
            lines += [f"## {dev.label} (`results/{dev.slug}/`): every point", "", *points_table(dev, refs), ""]
    lines += _method(devices)
    readme = out / "README.md"
    atomic_write_text(readme, "\n".join(lines).rstrip() + "\n")
    return readme


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=HERE / "results", help="folder of results/<device>/*.json")
    p.add_argument("--out", type=Path, default=HERE, help="folder for README.md and plots/")
    args = p.parse_args(argv)
    try:
        print(build(args.results, args.out))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
