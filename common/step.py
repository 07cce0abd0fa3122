"""One optimizer step: precision (autocast and its GradScaler), torch.compile, the optimizer with its schedule,
scaler and EMA, and ``StepRunner``, which does forward, backward and (every ``accumulation`` micro-batches) the
step. Shared by training, the benchmark and the tests.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common.builders import build_optimizer, build_scheduler, load_optimizer_state
from common.registry import ModelSpec

if TYPE_CHECKING:
    from common.distill import Distiller


def resolve_amp(amp: bool | None, device: torch.device) -> bool:
    """``--amp`` as given, else on for CUDA (as NVIDIA's recipes train) and off on CPU, where autocast is
    slower than fp32 on cores without bf16 units."""
    return device.type == "cuda" if amp is None else amp


@dataclass(frozen=True)
class Precision:
    """Autocast on or off, and its dtype; float16 is the one that needs a GradScaler."""

    amp: bool = False
    dtype: str = "float16"

    @property
    def needs_scaler(self) -> bool:
        return self.amp and self.dtype == "float16"

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=getattr(torch, self.dtype), enabled=self.amp)


def compile_model(model: nn.Module, mode: str | None) -> nn.Module:
    """``torch.compile`` in ``mode`` (None: the model as it is).

    ``dynamic=False``: a last partial eval batch gets its own graph, compiled once and reused every epoch,
    rather than turning the batch dimension symbolic, which would make every full batch run slower code (and,
    with reduce-overhead, still record one CUDA graph per size).
    """
    return model if mode is None else torch.compile(model, mode=mode, dynamic=False)


# ----------------------------------------------------------------------------------------------------------
# One optimizer step


class WeightAverage(AveragedModel):
    """An EMA of the weights and buffers, as ``AveragedModel(use_buffers=True)`` with torch's EMA function keeps
    it (same updates, same state_dict), except that its update count is mirrored on the host.

    torch's ``update_parameters`` tests ``n_averaged == 0`` and ``> 0`` on the device tensor: two host syncs per
    optimizer step on a GPU. Here the count is read once (at the first update, and after a checkpoint load).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.updates: int | None = None  # host copy of n_averaged; None: read it at the next update

    def load_state_dict(self, *args, **kwargs):
        self.updates = None
        return super().load_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self.updates is None:
            self.updates = int(self.n_averaged)
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.updates == 0:
            for own, theirs in zip(averaged, current, strict=True):
                own.copy_(theirs)
        else:
            groups: dict = {}  # torch's EMA function takes tensors of one dtype per call
            for own, theirs in zip(averaged, current, strict=True):
                pair = groups.setdefault((own.device, own.dtype), ([], []))
                pair[0].append(own)
                pair[1].append(theirs)
            for (device, _), (own, theirs) in groups.items():
                self.multi_avg_fn(own, theirs, self.n_averaged.to(device))
        self.n_averaged += 1
        self.updates += 1


@dataclass
class Optimization:
    """Everything that turns gradients into new weights: the optimizer and its schedule, the fp16 loss
    scaler, the weights' EMA, and how gradients are gathered (accumulated micro-batches, clipping)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightAverage | None = None
    accumulation: int = 1
    clip_grad_norm: float | None = None

    def state_dict(self) -> dict:
        """The components' states, under the checkpoint's historical keys."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the checkpoint ran without fp16: the fresh scaler then starts anew
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])


def build_optimization(model: nn.Module, cfg, lr: float, steps_per_epoch: int, precision: Precision,
                       accumulation: int = 1, spec: ModelSpec | None = None) -> Optimization:  # fmt: skip
    """The optimizer over the model's parameter groups (fused on CUDA), the per-step LR schedule, a GradScaler
    enabled for fp16 autocast, and an EMA when ``cfg.ema_decay`` asks for one.

    ``cfg`` is a :class:`TrainConfig` (the benchmark passes the defaults, so it times the same step); ``spec``
    names the head, for a backbone learning rate of its own (``cfg.backbone_lr_mult``).
    """
    device_type = next(model.parameters()).device.type
    optimizer = build_optimizer(model, cfg, lr, spec)
    return Optimization(
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, steps_per_epoch),
        scaler=torch.amp.GradScaler(device_type, enabled=precision.needs_scaler),
        ema=WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None,
        accumulation=accumulation,
        clip_grad_norm=cfg.clip_grad_norm,
    )


class StepRunner:
    """Forward and backward under autocast; every ``accumulation`` micro-batches: unscale, clip, step, update.

    The loss is divided by ``accumulation`` so accumulated gradients equal those of one large batch, and
    DDP's all-reduce is skipped (``no_sync``) on all but the last micro-batch.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimization: Optimization, precision: Precision,
                 mixup: float = 0.0, cuda_graphs: bool = False, distiller: Distiller | None = None):  # fmt: skip
        self.model, self.criterion, self.opt, self.precision = model, criterion, optimization, precision
        self.mixup = mixup
        self.cuda_graphs = cuda_graphs  # the model is compiled with mode="reduce-overhead"
        self.distiller = distiller  # --teacher: its outputs join the loss (common/distill.py)
        self.micro_step = 0

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.opt.optimizer

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(images.device):
            if self.mixup > 0:
                # Rolling the batch by one pairs every image with another at no shuffling cost.
                lam = float(np.random.beta(self.mixup, self.mixup))
                images = images.mul(lam).add_(images.roll(1, 0), alpha=1 - lam)
                out = self.model(images)
                loss = lam * self.criterion(out, labels) + (1 - lam) * self.criterion(out, labels.roll(1, 0))
            else:
                out = self.model(images)
                loss = self.criterion(out, labels)
            if self.distiller is not None:
                # The teacher sees the very batch the student saw, mixed images included, under the same autocast.
                loss = self.distiller(loss, out, images)
            return loss

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Run one micro-batch; returns (loss, whether an optimizer step was taken)."""
        opt = self.opt
        if self.cuda_graphs:
            # Tells the CUDA graph trees a new iteration starts: the last one's outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        self.micro_step += 1
        boundary = self.micro_step % opt.accumulation == 0
        sync = nullcontext() if boundary or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            loss = self.loss(images, labels)
            opt.scaler.scale(loss / opt.accumulation).backward()
        if boundary:
            if opt.clip_grad_norm:
                opt.scaler.unscale_(opt.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), opt.clip_grad_norm)
            # A fused optimizer reads the scale and the inf flag on the device: this waits for nothing.
            opt.scaler.step(opt.optimizer)
            opt.scaler.update()
            opt.optimizer.zero_grad(set_to_none=True)
            opt.scheduler.step()
            if opt.ema is not None:
                opt.ema.update_parameters(unwrap(self.model))
        return loss.detach(), boundary


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers: what gets saved and evaluated."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
