"""Evaluation on the device: loss, top-1/top-5, the confusion matrix (and one-vs-rest metrics), summed over ranks
with one host sync per evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import distributed as dist
from common.metrics import one_vs_rest, roc_auc
from common.step import Precision


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

    def metrics(self, prefix: str) -> dict:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        out = {
            f"{prefix}.loss": self.loss,
            f"{prefix}.top1": self.top1,
            f"{prefix}.top5": self.top5,
            f"{prefix}.compute_latency_mean": float(lat.mean()) / 1000,
            f"{prefix}.compute_latency_at99": float(np.percentile(lat, 99)) / 1000,
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
