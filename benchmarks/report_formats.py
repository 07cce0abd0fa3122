"""The report's formats section: the files ``convnets benchmark --mode formats`` writes (``kind: formats``), one
per trained model, as a table per model (top-1 and, at each batch size, images per second and latency
percentiles of one batch) and a speed-against-accuracy plot per device."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository


def is_formats_result(r: dict) -> bool:
    return r.get("kind") == "formats"


def formats_table(r: dict) -> list[str]:
    """One model's formats: a row per format, a column per batch size, then what could not run and why."""
    sizes = [str(b) for b in r["batch_sizes"]]
    pcts = ["p50", "p90", "p99"]
    head = "| format | precision | device | top-1 | " + " | ".join(
        f"batch {b}: img/s ({' / '.join(pcts)} ms)" for b in sizes
    )
    lines = [head + " |", "| --- | --- | --- | ---: |" + " ---: |" * len(sizes)]
    for name, f in r["formats"].items():
        cells = []
        for b in sizes:
            t = f["by_batch_size"].get(b)
            if t is None:
                cells.append("—")
                continue
            latency = " / ".join(f"{t['latency_ms'][p]:.2f}" for p in pcts)
            cells.append(f"{t['throughput_img_s']:,.1f} ({latency})")
        lines.append(f"| {name} | {f['precision']} | {f['device']} | {f['top1']:.2f}% | " + " | ".join(cells) + " |")
    if r.get("unavailable"):
        lines += ["", "Not measured on this machine: " + "; ".join(
            f"**{name}** ({why})" for name, why in r["unavailable"].items()) + "."]  # fmt: skip
    return lines


def formats_section(devices: list, plots: Path, save, log_axes) -> list[str]:
    """The README lines of every device's formats results (empty when there are none); writes the plots."""
    with_formats = [d for d in devices if d.formats]
    if not with_formats:
        return []
    lines = [
        "## Every format: speed and accuracy",
        "",
        "`convnets benchmark --mode formats --checkpoint C --data DIR` (`bash benchmarks/formats_fashion_mnist.sh` "
        "for the three Fashion-MNIST models below): one trained checkpoint run in each format, each fed the same "
        "host batch of real validation images and returning host probabilities, warm-up iterations first, then "
        "timed ones (one batch each: img/s, and latency percentiles of one batch); top-1 on DIR's validation images "
        "through `evaluate`'s preprocessing and counting. INT8 formats calibrate on DIR/train as `convnets export "
        "--int8` does.",
        "",
    ]
    for dev in with_formats:
        for r in sorted(dev.formats, key=lambda r: r["arch"]):
            lines += [f"### {r['arch']}, {r['image_size']} px, on {dev.label} (`{r['_file']}`)", "",
                      f"{r['iterations']} timed iterations after {r['warmup']} warm-up, {r['threads']} threads; "
                      f"top-1 on {r['formats'] and next(iter(r['formats'].values()))['eval_images']} images of "
                      f"`{shown_path(r['data'])}`.", "", *formats_table(r), ""]  # fmt: skip
        name = plot_formats(dev, plots, save, log_axes)
        if name:
            lines += [f"![speed against accuracy, every format](plots/{name})", ""]
    return lines


def shown_path(path: str) -> str:
    """A data path inside this repository relative to it (the machine's own folders stay out of the report)."""
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else path


def plot_formats(dev, plots: Path, save, log_axes) -> str | None:
    """Top-1 against images per second at the largest batch size, a panel per model, a labelled point per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in sorted(dev.formats, key=lambda r: r["arch"]) if r["formats"]]
    if not results:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        batch = str(max(r["batch_sizes"]))
        points = sorted((f["by_batch_size"][batch]["throughput_img_s"], name, f) for name, f in r["formats"].items())
        for i, (speed, name, f) in enumerate(points):
            ax.scatter(speed, f["top1"], s=36, marker="s" if f["precision"] == "int8" else "o")
            # Formats often share a top-1: neighbours' labels take turns above and below so that they stay legible.
            ax.annotate(name, (speed, f["top1"]), fontsize=7, xytext=(4, (4, -11, 15, -22)[i % 4]),
                        textcoords="offset points", arrowprops={"arrowstyle": "-", "lw": 0.4})  # fmt: skip
        ax.set(xscale="log", xlabel=f"images / s at batch {batch}", ylabel="top-1 (%)", title=f"{r['arch']}")
        log_axes(ax)
        ax.margins(x=0.2)  # room for the rightmost point's label
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"every format, speed against accuracy (squares: INT8): {dev.label}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    name = f"{dev.slug}_formats.png"
    save(fig, plots / name)
    plt.close(fig)
    return name
