"""``evaluate`` and ``predict``: a trained checkpoint applied to a labelled folder or to loose images."""

from __future__ import annotations

import csv
import glob
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common.atomic import ensure_writable
from common.builders import build_model
from common.checkpoint import atomic_write_text, load_checkpoint
from common.config import EvaluateConfig, PredictConfig
from common.data import (
    Normalizer,
    PipelineSpec,
    build_loader,
    default_backend,
    drop_bad_images,
    eval_transform,
    image_files,
    load_rgb,
    log_ignored,
    scan_split,
)
from common.distributed import resolve_device
from common.errors import UserError
from common.evaluation import class_probabilities, evaluate, evaluate_multilabel
from common.registry import get_model_spec

log = logging.getLogger("convnets")


@dataclass
class TrainedModel:
    model: torch.nn.Module
    classes: list[str]
    config: dict
    pipeline: PipelineSpec
    device: torch.device
    thresholds: list[float] | None = None  # multi-label: per-label thresholds tuned on the validation set

    @property
    def multilabel(self) -> bool:
        return bool(self.config.get("multilabel"))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return class_probabilities(logits, len(self.classes), self.multilabel)


def load_trained(path: str, device: torch.device, width_mult: float | None = None, batch_size: int = 64,
                 workers: int = 2) -> TrainedModel:  # fmt: skip
    """Rebuild the model a checkpoint was trained as (arch, width, classes, eval sizes) and load its weights."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"checkpoint {path} is not a convnets training checkpoint (no model/config entries)")
    cfg = state["config"]
    spec = get_model_spec(cfg["arch"])
    if width_mult is not None and width_mult != cfg.get("width_mult"):
        raise UserError(f"--width-mult {width_mult} differs from the checkpoint's ({cfg.get('width_mult')}) in {path}")
    model = build_model(spec, cfg["num_classes"], cfg.get("width_mult"), freeze=cfg.get("freeze_backbone", False))
    model.load_state_dict(state["model"])
    memory_format = torch.channels_last if cfg.get("memory_format") == "channels_last" else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    pipeline = PipelineSpec(
        image_size=cfg["image_size"],
        resize_size=cfg["val_resize"],
        batch_size=batch_size,
        workers=workers,
        channels_last=cfg.get("memory_format") == "channels_last",
    )
    return TrainedModel(model, list(state["class_names"]), cfg, pipeline, device, state.get("thresholds"))


def save_confusion_png(confusion: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.double()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * n + 2), max(5, 0.45 * n + 1.5)))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if n <= 50:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if counts[i, j] > 0:
                        color = "white" if rates[i, j] > 0.5 else "black"
                        ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """A checkpoint on a labelled split, written to metrics.json: top-1/top-5, loss, per-class accuracy and a
    confusion matrix PNG (with ``--positive-class``, its precision, recall, F1 and ROC AUC); for a multi-label
    checkpoint, mAP, and per-label AP and F1 at the thresholds tuned on the validation set during training."""
    device = resolve_device(cfg.device)
    trained = load_trained(cfg.checkpoint, device, cfg.width_mult, cfg.batch_size, cfg.workers)
    root = Path(cfg.data)
    split = root / "val" if (root / "val").is_dir() else root
    # Beside the checkpoint by default, which may be another user's folder or a read-only mount: said before the work.
    output = Path(cfg.output) if cfg.output else Path(cfg.checkpoint).parent / f"eval_{split.name}"
    ensure_writable(output, "the evaluation", instead="; or pass --output DIR")
    images = scan_split(split, classes=trained.classes)
    if images.multilabel != trained.multilabel:
        kinds = ("multi-label (labels.csv)", "single-label (class folders)")
        raise UserError(f"{split} is {kinds[not images.multilabel]} but checkpoint {cfg.checkpoint} was trained on "
                        f"{kinds[not trained.multilabel]} data")  # fmt: skip
    backend = cfg.data_backend or default_backend(device)
    (images,) = drop_bad_images([images], cfg.image_check, cfg.skip_bad_images, cfg.workers,
                                dali=backend.startswith("dali"))  # fmt: skip
    loader = build_loader(backend, images, trained.pipeline, train=False, device=device)
    head = {"checkpoint": str(cfg.checkpoint), "data": str(split), "arch": trained.config["arch"]}
    if trained.multilabel:
        metrics = head | multilabel_metrics(trained, loader, split, cfg.json)
    else:
        metrics = head | single_label_metrics(trained, loader, split, output, cfg.positive_class, cfg.json)
    atomic_write_text(output / "metrics.json", json.dumps(metrics, indent=2))
    return {k: v for k, v in metrics.items() if k != "confusion"}  # the matrix stays in the file


def single_label_metrics(trained: TrainedModel, loader, split: Path, output: Path, positive_class: str | None,
                         quiet: bool) -> dict:  # fmt: skip
    positive_class = positive_class or trained.config.get("positive_class")
    positive = None
    if positive_class is not None:
        if positive_class not in trained.classes:
            raise UserError(f"--positive-class {positive_class!r} is not one of the checkpoint's classes: "
                            f"{', '.join(trained.classes)}")  # fmt: skip
        positive = trained.classes.index(positive_class)
    # The model's own output size: a run trained with a larger --num-classes than its folders predicts there too.
    result = evaluate(trained.model, loader, trained.config["num_classes"], positive=positive)
    confusion = result.confusion[: len(trained.classes), : len(trained.classes)]
    per_class = {}
    for i, name in enumerate(trained.classes):
        total = int(confusion[i].sum())
        if total:
            per_class[name] = {"accuracy": 100 * int(confusion[i, i]) / total, "count": total}
    binary = {}
    if positive is not None:
        found = result.metrics("eval")
        binary = {"positive_class": positive_class} | {
            k: found[f"eval.{k}"] for k in ("precision", "recall", "f1", "roc_auc")
        }
    title = f"{trained.config['arch']} on {split}: top-1 {result.top1:.2f}%"
    save_confusion_png(confusion, trained.classes, output / "confusion_matrix.png", title)
    if not quiet:
        log.info("%s: %d images  top-1 %.2f%%  top-5 %.2f%%  loss %.4f", split, result.count, result.top1,
                 result.top5, result.loss)  # fmt: skip
        if binary:
            log.info("  %s against the rest: precision %.4f  recall %.4f  F1 %.4f  ROC AUC %.4f", positive_class,
                     binary["precision"], binary["recall"], binary["f1"], binary["roc_auc"])  # fmt: skip
        for name, c in per_class.items():
            log.info("  %-24s %6.2f%%  (%d images)", name, c["accuracy"], c["count"])
        log.info("confusion matrix: %s", output / "confusion_matrix.png")
    return {"images": result.count, "top1": result.top1, "top5": result.top5, "loss": result.loss,
            "per_class": per_class, **binary, "confusion_matrix_png": str(output / "confusion_matrix.png"),
            "confusion": confusion.tolist()}  # fmt: skip


def multilabel_metrics(trained: TrainedModel, loader, split: Path, quiet: bool) -> dict:
    """mAP and per-label AP; F1 at the checkpoint's thresholds (tuned on the validation set in training: on a
    test split that is an honest F1, on the validation split itself an optimistic one)."""
    result = evaluate_multilabel(trained.model, loader, len(trained.classes), thresholds=trained.thresholds)
    r = result.report
    per_class = {
        name: {"ap": r["ap"][i], "f1": r["f1"][i], "threshold": r["thresholds"][i], "positives": r["positives"][i]}
        for i, name in enumerate(trained.classes)
    }
    if not quiet:
        log.info("%s: %d images  mAP %.2f%%  F1 macro %.4f  micro %.4f  exact match %.4f  loss %.4f", split,
                 result.count, result.score, r["f1_macro"], r["f1_micro"], r["exact_match"], result.loss)  # fmt: skip
        for name, c in per_class.items():
            log.info("  %-24s AP %.4f  F1 %.4f at %.3f  (%d positives)", name, c["ap"], c["f1"], c["threshold"],
                     c["positives"])  # fmt: skip
    return {"images": result.count, "multilabel": True, "map": result.score, "loss": result.loss,
            "f1_macro": r["f1_macro"], "f1_micro": r["f1_micro"], "exact_match": r["exact_match"],
            "thresholds_from": "checkpoint" if trained.thresholds else "tuned on this split",
            "per_class": per_class}  # fmt: skip


def expand_paths(patterns: list[str]) -> list[tuple[str, str | None]]:
    """Files, folders (recursive) and globs, in order; ``(pattern, error)`` where a pattern matches nothing."""
    out: list[tuple[str, str | None]] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found, ignored = image_files(p)
            log_ignored(p, ignored)
            out += [(f, None) for f in found] or [(pattern, "folder holds no image file")]
        elif p.is_file():
            out.append((pattern, None))
        else:
            matches = sorted(f for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
            out += [(f, None) for f in matches] or [(pattern, "no such file")]
    return out


def run_predict(cfg: PredictConfig) -> int:
    """Top-k classes with probabilities per image, as JSON lines or CSV; a bad file gets its own error line.
    A multi-label checkpoint also gives each image its labels: those scoring at least their threshold."""
    if cfg.topk < 1:
        raise UserError(f"--topk must be at least 1, got {cfg.topk}")
    device = resolve_device(cfg.device)
    trained = load_trained(cfg.checkpoint, device)
    transform = eval_transform(trained.pipeline)
    k = min(cfg.topk, len(trained.classes))
    normalize = Normalizer(device, trained.pipeline.channels_last)
    thresholds = None
    if trained.multilabel:
        # Tuned on the validation set in training; 0.5 for a checkpoint saved before any evaluation.
        thresholds = torch.tensor(trained.thresholds or [0.5] * len(trained.classes), device=device)
    writer = csv.writer(sys.stdout) if cfg.csv else None
    if writer:
        label_column = ["labels"] if thresholds is not None else []
        writer.writerow(["path"] + label_column + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")]
                        + ["error"])  # fmt: skip
    failures = 0

    def emit(path: str, top: list[tuple[str, float]] | None, labels: list[str] | None, error: str | None) -> None:
        if writer:
            cells = [x for name, prob in (top or []) for x in (name, f"{prob:.6f}")]
            label_cell = [";".join(labels or [])] if thresholds is not None else []
            writer.writerow([path] + label_cell + cells + [""] * (2 * k - len(cells)) + [error or ""])
        else:
            record = {"path": path, "error": error} if error else {"path": path, "top": [
                {"class": name, "prob": round(prob, 6)} for name, prob in top]}  # fmt: skip
            if labels is not None:
                record["labels"] = labels
            print(json.dumps(record), flush=True)

    # Entries keep their input order; failed ones carry an error instead of a tensor.
    batch: list[tuple[str, torch.Tensor | None, str | None]] = []

    def flush() -> None:
        good = [t for _, t, _ in batch if t is not None]
        results = iter([])
        if good:
            images = normalize(torch.stack(good).to(device))
            with torch.no_grad():
                scores = trained.scores(trained.model(images))
            values, indices = scores.topk(k, dim=1)
            chosen = (scores >= thresholds).tolist() if thresholds is not None else [None] * len(good)
            results = iter(zip(values.tolist(), indices.tolist(), chosen, strict=True))
        for path, tensor, error in batch:
            if tensor is None:
                emit(path, None, None, error)
            else:
                v, i, chosen_row = next(results)
                labels = (
                    None
                    if chosen_row is None
                    else [c for c, yes in zip(trained.classes, chosen_row, strict=True) if yes]
                )
                emit(path, [(trained.classes[c], p) for c, p in zip(i, v, strict=True)], labels, None)
        batch.clear()

    for path, error in expand_paths(cfg.paths):
        tensor = None
        if error is None:
            try:
                tensor = transform(load_rgb(path))
            except Exception as e:  # noqa: BLE001 - any decoding failure is reported for this file only
                error = f"cannot decode: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
        failures += error is not None
        batch.append((path, tensor, error))
        if len(batch) >= cfg.batch_size:
            flush()
    flush()
    if failures:
        print(f"{failures} file(s) could not be classified", file=sys.stderr)
    return 1 if failures else 0
