"""The training loss: cross-entropy over classes, or binary cross-entropy per class for multi-label data, with
label smoothing and ``--balance`` meaning the same thing for both; and the knowledge-distillation loss that mixes a
teacher's softened outputs into either."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("convnets")


def class_weights(counts: list[int], num_classes: int, device: torch.device) -> torch.Tensor:
    """Cross-entropy weights for ``--balance``: inverse class frequency, scaled so that the mean weight over the
    training images is 1 (the loss, and so the learning rate, keep their scale). A class without images (a
    ``--num-classes`` larger than the folders) gets weight 1: it never appears as a target."""
    counts_t = torch.zeros(num_classes, dtype=torch.float64)
    counts_t[: len(counts)] = torch.tensor(counts, dtype=torch.float64)
    present = counts_t > 0
    weights = torch.ones(num_classes, dtype=torch.float64)
    weights[present] = counts_t.sum() / (present.sum() * counts_t[present])
    log.info("--balance: class weights %.3g to %.3g (inverse class frequency)", weights[present].min().item(),
             weights[present].max().item())  # fmt: skip
    return weights.float().to(device)


def positive_weights(counts: list[int], images: int, device: torch.device) -> torch.Tensor:
    """Binary cross-entropy ``pos_weight`` for ``--balance`` on multi-label data: negatives / positives per class
    (a rare label's few positives weigh as much as its many negatives), capped at 100 so that a class with a
    handful of positives does not swamp the loss; a class without positives gets 1."""
    pos = torch.tensor(counts, dtype=torch.float64)
    weights = torch.where(pos > 0, ((images - pos) / pos.clamp(min=1)).clamp(1.0 / 100, 100.0), torch.ones_like(pos))
    log.info("--balance: positive weights %.3g to %.3g (negatives / positives per label)", weights.min().item(),
             weights.max().item())  # fmt: skip
    return weights.float().to(device)


class MultiLabelLoss(nn.Module):
    """Binary cross-entropy with logits, averaged over classes and images. Label smoothing moves every target
    ``smoothing / 2`` towards 1/2 (the binary form of cross-entropy's smoothing: each label is a two-class
    problem); mixup's mixed targets stay in [0, 1], which this loss takes as they are."""

    def __init__(self, smoothing: float = 0.0, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.smoothing = smoothing
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.smoothing:
            targets = targets * (1 - self.smoothing) + self.smoothing / 2
        return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.pos_weight)


def build_criterion(multilabel: bool, counts: list[int], images: int, num_classes: int, smoothing: float,
                    balance: bool, device: torch.device) -> nn.Module:  # fmt: skip
    """The loss for the data: softmax cross-entropy for one class per image, per-class sigmoid for several."""
    if multilabel:
        return MultiLabelLoss(smoothing, positive_weights(counts, images, device) if balance else None)
    weights = class_weights(counts, num_classes, device) if balance else None
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=smoothing)


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      multilabel: bool = False) -> torch.Tensor:  # fmt: skip
    """``T^2 x KL(teacher || student)`` of the logits softened by ``T`` (Hinton et al. 2015, "Distilling the
    knowledge in a neural network"), in float32 whatever the autocast dtype.

    Single-label: the KL divergence of the softmax over classes, summed over classes and averaged over images, as
    cross-entropy is. Multi-label: each label's sigmoid is a two-class softmax, so the term is the KL divergence of
    the two Bernoulli distributions, averaged over labels and images, as the binary cross-entropy is. The factor
    T^2 keeps the term's gradients at the scale of the usual loss's: softening by T shrinks them by 1/T^2.
    """
    s, t = student.float() / temperature, teacher.float() / temperature
    if multilabel:
        p = torch.sigmoid(t)
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        return kl.mean() * temperature**2
    kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
    return kl * temperature**2


class DistillationLoss(nn.Module):
    """``(1 - alpha) x usual + alpha x distillation_term(student, teacher)``.

    It takes the usual loss already computed rather than the labels: under mixup the usual loss is the mix of two
    label sets' losses, while the teacher, given the same mixed images, already gives the mixed image's targets.
    """

    def __init__(self, alpha: float, temperature: float, multilabel: bool = False):
        super().__init__()
        self.alpha, self.temperature, self.multilabel = alpha, temperature, multilabel

    def forward(self, usual: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        distilled = distillation_term(student, teacher, self.temperature, self.multilabel)
        return (1 - self.alpha) * usual + self.alpha * distilled
