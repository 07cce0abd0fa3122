"""``convnets learning-curve``: how many images are enough. Fine-tunes on growing stratified subsets of the
training set against the same validation set, then writes a table, a plot and a plain verdict.

DATA's images are checked once, up front; each subset run finds every file's verdict in its own check cache
(copied from DATA's) and opens none, so N fractions cost one check, not N.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from pathlib import Path

import numpy as np

from common.checkpoint import atomic_write_text
from common.config import LearningCurveConfig, TrainConfig
from common.data import CheckCache, ImageList, drop_bad_images, scan_split
from common.data.folders import write_labels_csv
from common.errors import UserError

log = logging.getLogger("convnets")

# The last doubling of the training set must gain at least this many points of top-1 for "still rising".
RISING_GAIN_PER_DOUBLING = 1.0


def parse_fractions(text: str) -> list[float]:
    """``"0.1,0.25,0.5,1.0"`` -> sorted fractions in (0, 1]; at least two."""
    try:
        fractions = sorted({float(f) for f in text.replace(",", " ").split()})
    except ValueError:
        raise UserError(f"--fractions {text!r}: expected numbers such as 0.1,0.25,0.5,1.0") from None
    if len(fractions) < 2 or not all(0 < f <= 1 for f in fractions):
        raise UserError(f"--fractions {text!r}: give at least two fractions in (0, 1], e.g. 0.1,0.25,0.5,1.0")
    return fractions


def stratified_subsets(labels: list, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Indices of each fraction's subset: ``ceil(fraction x n_c)`` images of every class c (at least one), the
    first of one fixed per-class permutation, so every subset holds the smaller ones (a curve, not noise).
    Multi-label rows (0/1 per class) are stratified by their rarest label, so rare labels reach every subset."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        frequency = labels.sum(0)
        # The least frequent label of each image (-1: none); argmin over counts where the image has the label.
        labels = np.where(labels.any(1), np.argmin(np.where(labels > 0, frequency, np.inf), axis=1), -1)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return [np.sort(np.concatenate([o[: max(1, math.ceil(f * len(o)))] for o in orders])) for f in fractions]


def link_subset(data: Path, images: ImageList, subset: np.ndarray, root: Path) -> dict[str, str]:
    """``root/train/<class>/`` of symbolic links to the ``subset`` of ``images`` (multi-label: ``root/train/images/``
    and its ``labels.csv``) and ``root/val`` linked to ``data/val``: a tree that costs no copy. Made afresh each
    time, so a re-run with other fractions is right. Returns ``{link: file}`` for the training files."""
    import shutil

    if root.exists():
        shutil.rmtree(root)
    links, rows = {}, []
    for k, i in enumerate(subset):
        path, label = images.files[i], images.labels[i]
        folder = root / "train" / ("images" if images.multilabel else images.classes[label])
        folder.mkdir(parents=True, exist_ok=True)
        # A running number keeps two files of one name from different sub-folders apart.
        link = folder / f"{k:07d}_{Path(path).name}"
        link.symlink_to(Path(path).resolve())
        links[str(link)] = path
        if images.multilabel:
            rows.append((f"images/{link.name}", [images.classes[c] for c in np.flatnonzero(label)]))
    if images.multilabel:
        write_labels_csv(root / "train", rows)
    (root / "val").symlink_to((data / "val").resolve(), target_is_directory=True)
    return links


def share_verdicts(checked: CheckCache, root: Path, links: dict[str, str]) -> None:
    """Write ``root``'s image-check cache from DATA's (``checked``): a link's size and mtime are its target's
    (``stat`` follows links), so the subset run's check finds every file's verdict and size and opens none."""
    subset = CheckCache(root, load=False)
    shared = {subset.key(link): checked.entries.get(checked.key(path)) for link, path in links.items()}
    # root/val links to DATA/val: the same paths below the root, so the same keys.
    shared |= {key: entry for key, entry in checked.entries.items() if key.startswith("val" + os.sep)}
    subset.update({key: entry for key, entry in shared.items() if entry is not None})
    subset.save()


def verdict(sizes: list[int], top1: list[float], metric: str = "top-1") -> str:
    """Still rising (more images should help) or flat, from the last two points, as points of the metric (top-1,
    or mAP for multi-label data) per doubling of the training set."""
    doublings = math.log2(sizes[-1] / sizes[-2]) if sizes[-1] > sizes[-2] else 0.0
    gain = top1[-1] - top1[-2]
    per_doubling = gain / doublings if doublings else 0.0
    if per_doubling >= RISING_GAIN_PER_DOUBLING:
        return (f"still rising: the last step ({sizes[-2]} -> {sizes[-1]} images) gained {gain:+.1f} points of "
                f"{metric} ({per_doubling:+.1f} per doubling); more images should help")  # fmt: skip
    return (f"flat: the last step ({sizes[-2]} -> {sizes[-1]} images) gained {gain:+.1f} points of {metric} "
            f"({per_doubling:+.1f} per doubling, under {RISING_GAIN_PER_DOUBLING:g}); more images of the same kind "
            "will not help much: look at the errors, the classes, or the model")  # fmt: skip


def write_plot(path: Path, sizes: list[int], top1: list[float], title: str, metric: str = "top-1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(sizes, top1, marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("training images")
    ax.set_ylabel(f"validation {metric} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def final_metrics(log_path: Path, key: str = "val.top1") -> dict:
    """The last validation metrics a finished run logged."""
    from common.logger import read_log

    finished = [r["data"] for r in read_log(log_path) if key in r["data"]]
    if not finished:
        raise UserError(f"{log_path}: the run has no validation result; remove {log_path.parent} to train it anew")
    return finished[-1]


def check_once(data: Path, cfg: LearningCurveConfig) -> ImageList:
    """DATA/train and DATA/val checked as ``train`` would check them (``--image-check``, ``--skip-bad-images``,
    DALI's decoder for the DALI backends), once for every point of the curve; returns DATA/train's good files."""
    train_images = scan_split(data / "train")
    val_images = scan_split(data / "val", classes=train_images.classes)
    mode = "none" if cfg.data_backend == "synthetic" else cfg.image_check
    dali = cfg.data_backend in (None, "dali-cpu", "dali-gpu")  # the default is a DALI backend on either device
    log.info("learning curve: checking %s once (--image-check %s); each point's run reuses its verdicts", data, mode)
    train_images, _ = drop_bad_images([train_images, val_images], mode, cfg.skip_bad_images, cfg.workers, dali=dali)
    return train_images


def run_learning_curve(cfg: LearningCurveConfig) -> dict:
    """Train once per fraction (same configuration, same validation set); write ``learning_curve.md``,
    ``learning_curve.json`` and ``learning_curve.png`` in ``cfg.output``. Returns the table and the verdict."""
    import json

    from common.engine import train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("learning-curve runs its trainings one after another in one process: start it without "
                        "torchrun")  # fmt: skip
    fractions = parse_fractions(cfg.fractions)
    data, out = Path(cfg.data), Path(cfg.output or "runs/learning-curve")
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        raise UserError(f"--data {data}: expected an ImageFolder root with train/ and val/")
    images = check_once(data, cfg)
    key, metric = ("val.map", "mAP") if images.multilabel else ("val.top1", "top-1")
    subsets = stratified_subsets(images.labels, fractions, cfg.seed)
    # Each run's check reads headers only, every one of them already in its cache: it opens no file, leaves out
    # what DATA's check found bad (with --skip-bad-images), and hands the DALI feeder each image's size.
    image_check = "none" if cfg.image_check == "none" or cfg.data_backend == "synthetic" else "header"
    checked = CheckCache(data) if image_check != "none" else None
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    rows = []
    for fraction, subset in zip(fractions, subsets, strict=True):
        name = f"fraction_{fraction:g}"
        root = out / "subsets" / name
        links = link_subset(data, images, subset, root)
        if checked is not None:
            share_verdicts(checked, root, links)
        run_cfg = TrainConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in train_fields})
        batch = min(run_cfg.batch_size, len(subset))
        if batch < run_cfg.batch_size:
            log.info("learning curve: %s has %d training images, batch size %d -> %d", name, len(subset),
                     run_cfg.batch_size, batch)  # fmt: skip
        # resume auto: a curve run again (or after an interruption) continues each point instead of stopping at
        # its earlier checkpoints; a finished point is read back from its log.
        run_cfg = dataclasses.replace(run_cfg, data=str(root), output=str(out / name), batch_size=batch,
                                      optimizer_batch_size=None, resume="auto", image_check=image_check)  # fmt: skip
        log.info("learning curve: %s, %d training images", name, len(subset))
        metrics = train(run_cfg) or final_metrics(out / name / "log.json", key)
        rows.append({"fraction": fraction, "train_images": int(len(subset)), key: metrics[key],
                     "val.loss": metrics["val.loss"]})  # fmt: skip
    sizes, scores = [r["train_images"] for r in rows], [r[key] for r in rows]
    said = verdict(sizes, scores, metric)
    table = [f"| fraction | training images | val {metric} (%) | val loss |", "| ---: | ---: | ---: | ---: |"]
    table += [f"| {r['fraction']:g} | {r['train_images']} | {r[key]:.2f} | {r['val.loss']:.4f} |" for r in rows]
    title = f"{cfg.arch}, {cfg.epochs} epochs per point, {data.name}"
    out.mkdir(parents=True, exist_ok=True)
    write_plot(out / "learning_curve.png", sizes, scores, title, metric)
    atomic_write_text(out / "learning_curve.md", "\n".join([f"# Learning curve: {title}", "", *table, "",
                                                            f"**Verdict**: {said}.", "",
                                                            "![learning curve](learning_curve.png)", ""]))  # fmt: skip
    result = {"rows": rows, "verdict": said}
    atomic_write_text(out / "learning_curve.json", json.dumps(result, indent=2))
    log.info("learning curve:\n%s\nverdict: %s\nwrote %s", "\n".join(table), said, out / "learning_curve.md")
    return result
