"""Evaluation on the device: loss, top-1/top-5, the confusion matrix (and one-vs-rest metrics), summed over ranks
with one host sync per evaluation; for multi-label data the sigmoid scores, gathered for mAP and tuned F1."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import distributed as dist
from common.metrics import multilabel_report, one_vs_rest, roc_auc
from common.step import Precision


def class_probabilities(logits: torch.Tensor, num_named: int, multilabel: bool) -> torch.Tensor:
    """Probabilities of the named classes: a softmax over them, or a sigmoid per label for a multi-label model.
    Outputs no class name belongs to (a run with a larger ``--num-classes`` than its folders) are left out."""
    logits = logits[:, :num_named].float()
    return logits.sigmoid() if multilabel else logits.softmax(1)


def latency_metrics(prefix: str, latencies_ms: list[float]) -> dict:
    """Mean and 99th-percentile compute time per batch, in seconds (DLLogger's unit)."""
    lat = np.array(latencies_ms) if latencies_ms else np.zeros(1)
    return {
        f"{prefix}.compute_latency_mean": float(lat.mean()) / 1000,
        f"{prefix}.compute_latency_at99": float(np.percentile(lat, 99)) / 1000,
    }


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    count: int
    confusion: torch.Tensor  # [true, predicted] counts, on the CPU
    latencies_ms: list[float]
    positive: int | None = None  # --positive-class: its index, and every image's (score, is positive)
    scores: np.ndarray | None = None
    is_positive: np.ndarray | None = None

    score_name = "top1"  # what picks the best checkpoint

    @property
    def score(self) -> float:
        return self.top1

    def metrics(self, prefix: str) -> dict:
        out = {
            f"{prefix}.loss": self.loss,
            f"{prefix}.top1": self.top1,
            f"{prefix}.top5": self.top5,
            **latency_metrics(prefix, self.latencies_ms),
        }
        if self.positive is not None:
            binary = one_vs_rest(self.confusion.numpy(), self.positive)
            binary["roc_auc"] = roc_auc(self.scores, self.is_positive)
            out.update({f"{prefix}.{k}": v for k, v in binary.items()})
        return out


def batch_metrics(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, top-1 hits, top-k hits, count) as one float64 tensor, and the top-1 predictions; both
    on the logits' device, so a batch costs no transfer."""
    topk = logits.topk(k, dim=1).indices
    correct = topk.eq(labels.view(-1, 1))
    loss = F.cross_entropy(logits, labels, reduction="sum")
    # torch.full fills on the device; torch.tensor(n, device=cuda) would copy from the host and wait for it.
    count = torch.full((), float(labels.numel()), dtype=torch.float64, device=logits.device)
    sums = torch.stack([loss.double(), correct[:, 0].sum().double(), correct.any(1).sum().double(), count])
    return sums, topk[:, 0]


class BatchTimer:
    """Per-batch compute time without waiting for the device: on CUDA a pair of events per batch, read after
    the loop (one sync for all); on the CPU, where work runs as it is called, the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs: list = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.pairs.append((started, event))
        else:
            self.pairs.append((started, time.perf_counter()))

    def milliseconds(self) -> list[float]:
        """Each batch's time; call after the device has finished (the evaluation's one sync)."""
        if self.cuda:
            return [a.elapsed_time(b) for a, b in self.pairs]
        return [(b - a) * 1000 for a, b in self.pairs]


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, precision: Precision = Precision(),
             positive: int | None = None) -> EvalResult:  # fmt: skip
    """Loss, top-1/top-5 (percent) and the confusion matrix, summed over ranks; with ``positive`` (a class
    index) also every image's softmax score for that class, gathered from every rank, for its ROC AUC.

    Every count accumulates on the model's device; the host reads them once, after the last batch.
    """
    model.eval()
    k = min(5, num_classes)
    sums = confusion = timer = None
    scores: list[torch.Tensor] = []  # (score, label) pairs, kept on the device until the end
    for images, labels in loader:
        if sums is None:
            device = images.device
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
            confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
            timer = BatchTimer(device)
        started = timer.start()
        with precision.autocast(images.device):
            logits = model(images).float()
        batch, top1 = batch_metrics(logits, labels, k)
        sums += batch
        # scatter_add_, not bincount: CUDA's bincount reads the largest value on the host to size its output.
        confusion.scatter_add_(0, labels * num_classes + top1, torch.ones_like(top1))
        if positive is not None:
            scores.append(torch.stack([logits.softmax(1)[:, positive], labels.eq(positive).float()], 1))
        timer.stop(started)
    if sums is None:  # an empty shard: still take part in the reduction
        sums, confusion, timer = (
            torch.zeros(4, dtype=torch.float64),
            torch.zeros(num_classes**2, dtype=torch.int64),
            None,
        )
    # One tensor, one all-reduce and one transfer (float64 holds counts exactly up to 2**53).
    totals = dist.all_reduce_sum(torch.cat([sums, confusion.double()])).cpu()
    n = max(1.0, totals[3].item())
    binary = {}
    if positive is not None:
        mine = torch.cat(scores).double().cpu() if scores else torch.zeros(0, 2, dtype=torch.float64)
        pairs = torch.cat(dist.all_gather_object(mine)).numpy()
        binary = {"positive": positive, "scores": pairs[:, 0], "is_positive": pairs[:, 1] > 0.5}
    return EvalResult(
        loss=totals[0].item() / n,
        top1=100 * totals[1].item() / n,
        top5=100 * totals[2].item() / n,
        count=int(totals[3].item()),
        confusion=totals[4:].round().long().view(num_classes, num_classes),
        latencies_ms=timer.milliseconds() if timer else [],
        **binary,
    )


@dataclass
class MultiLabelResult:
    """A multi-label evaluation: the loss, and the report of :func:`common.metrics.multilabel_report` (mAP,
    per-class AP, F1 at per-class thresholds tuned here, or at the ``thresholds`` given)."""

    loss: float
    count: int
    report: dict
    latencies_ms: list[float]

    score_name = "map"

    @property
    def score(self) -> float:
        return 100 * self.report["map"]

    @property
    def thresholds(self) -> list[float]:
        return self.report["thresholds"]

    def metrics(self, prefix: str) -> dict:
        r = self.report
        return {
            f"{prefix}.loss": self.loss,
            f"{prefix}.map": self.score,  # percent, as top-1
            f"{prefix}.f1_macro": r["f1_macro"],
            f"{prefix}.f1_micro": r["f1_micro"],
            f"{prefix}.exact_match": r["exact_match"],
            **latency_metrics(prefix, self.latencies_ms),
        }


@torch.no_grad()
def evaluate_multilabel(model: nn.Module, loader, num_classes: int, precision: Precision = Precision(),
                        thresholds: list[float] | None = None) -> MultiLabelResult:  # fmt: skip
    """Binary cross-entropy (mean over classes) and every image's sigmoid scores with its targets, kept on the
    device until the end, then gathered from every rank (a validation set's N x classes floats) for mAP and F1.
    Without ``thresholds`` the F1 is at thresholds tuned on these images."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # loss, count; moved to the device at the first batch
    pairs: list[torch.Tensor] = []
    timer = None
    for images, targets in loader:
        if timer is None:
            timer, sums = BatchTimer(images.device), sums.to(images.device)
        started = timer.start()
        with precision.autocast(images.device):
            logits = model(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / targets.shape[1]
        count = torch.full((), float(targets.shape[0]), dtype=torch.float64, device=logits.device)
        sums += torch.stack([loss.double(), count])
        pairs.append(torch.stack([logits.sigmoid(), targets], 2))
        timer.stop(started)
    totals = dist.all_reduce_sum(sums).cpu()
    mine = torch.cat(pairs).cpu() if pairs else torch.zeros(0, num_classes, 2)
    gathered = torch.cat(dist.all_gather_object(mine)).double().numpy()
    n = max(1.0, totals[1].item())
    return MultiLabelResult(
        loss=totals[0].item() / n,
        count=int(totals[1].item()),
        report=multilabel_report(gathered[:, :, 0], gathered[:, :, 1] > 0.5, thresholds),
        latencies_ms=timer.milliseconds() if timer else [],
    )
