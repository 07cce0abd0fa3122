"""Builders: the model (with pretrained weights and head replacement), the optimizer and the LR schedule."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn as nn

from common.checkpoint import load_checkpoint
from common.errors import UserError
from common.registry import ModelSpec, create_model

log = logging.getLogger(__name__)


def _pretrained_state_dict(spec: ModelSpec, pretrained: str) -> dict:
    """A local file (raw state dict or one of our checkpoints), or a torchvision weights name via torch.hub."""
    if Path(pretrained).exists():
        state = load_checkpoint(pretrained)
        return state.get("model", state)
    if spec.torchvision_weights is None:
        raise UserError(f"--pretrained {pretrained}: not a file, and {spec.name} has no torchvision weights")
    import torchvision.models as tvm

    weights_enum = getattr(tvm, spec.torchvision_weights)
    name = pretrained.split(".")[-1]
    if name.upper() == "DEFAULT":
        name = "DEFAULT"
    if not hasattr(weights_enum, name):
        names = ", ".join(w.name for w in weights_enum)
        raise UserError(f"--pretrained {pretrained}: not a file, nor one of {spec.torchvision_weights}: {names}")
    weights = getattr(weights_enum, name)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise UserError(f"--pretrained {pretrained}: download of {weights.url} failed ({e})") from None


def load_pretrained(model: nn.Module, spec: ModelSpec, pretrained: str) -> None:
    """Load weights key for key; tensors whose shape differs (a new classifier head) keep their fresh init."""
    state = _pretrained_state_dict(spec, pretrained)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"--pretrained {pretrained} does not fit {spec.name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    reshaped = [k for k in own if own[k].shape != state[k].shape]
    if reshaped and not all(k.startswith(spec.head + ".") for k in reshaped):
        raise UserError(f"--pretrained {pretrained}: shapes differ outside the head ({spec.head}): {reshaped[:5]}")
    if reshaped:
        log.info("fine-tuning: new classifier head %s (%s)", spec.head, ", ".join(reshaped))
    model.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=False)


def freeze_backbone(model: nn.Module, spec: ModelSpec) -> None:
    """Train only the head: backbone parameters stop requiring gradients and its BatchNorm layers become
    torchvision's FrozenBatchNorm2d, so their statistics stay those of the pretrained weights."""
    from torchvision.ops import FrozenBatchNorm2d

    head = model.get_submodule(spec.head)
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
                setattr(module, child_name, frozen)


def build_model(
    spec: ModelSpec,
    num_classes: int,
    width_mult: float | None = None,
    pretrained: str | None = None,
    freeze: bool = False,
) -> nn.Module:
    """The registered model with ``num_classes`` outputs, optionally from pretrained weights and frozen."""
    model = create_model(spec.name, num_classes=num_classes, width_mult=width_mult)
    if pretrained:
        load_pretrained(model, spec, pretrained)
    if freeze:
        freeze_backbone(model, spec)
    return model


class BackboneStages:
    """Two-stage fine-tuning: for the first ``freeze_epochs`` epochs only the head trains, then everything.

    Stage 1 sets ``requires_grad=False`` on the backbone (no backbone gradients are computed, and optimizers skip
    parameters without a gradient: no update, no weight decay, no momentum) and keeps the backbone's BatchNorm
    layers in eval mode, so they normalise with the pretrained statistics and leave them untouched: a few epochs of
    a small data set's batch statistics would otherwise overwrite ImageNet's before the backbone even trains. The
    layers are not swapped for FrozenBatchNorm2d (as ``--freeze-backbone`` does) because stage 2 trains them again
    and the state_dict must keep its keys. The stage is a function of the epoch alone, so a resume lands in it.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, freeze_epochs: int):
        self.model, self.freeze_epochs = model, freeze_epochs
        head = model.get_submodule(spec.head)
        head_ids = {id(p) for p in head.parameters()}
        head_modules = {id(m) for m in head.modules()}
        self.backbone = [p for p in model.parameters() if id(p) not in head_ids]
        norms = (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        self.backbone_norms = [m for m in norms if id(m) not in head_modules]

    def frozen(self, epoch: int) -> bool:
        return epoch < self.freeze_epochs

    def apply(self, epoch: int) -> None:
        """Set the stage of ``epoch``; call after ``model.train()``, which would put the BatchNorm layers back in
        training mode."""
        frozen = self.frozen(epoch)
        for p in self.backbone:
            p.requires_grad_(not frozen)
        if frozen and self.model.training:
            for m in self.backbone_norms:
                m.eval()


def head_parameter_ids(model: nn.Module, spec: ModelSpec) -> set[int]:
    return {id(p) for p in model.get_submodule(spec.head).parameters()}


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def parameter_groups(model: nn.Module, weight_decay: float, bn_decay: bool, depthwise_decay: bool,
                     head: set[int] | None = None, backbone_lr: float | None = None) -> list[dict]:  # fmt: skip
    """Split parameters into decayed and not decayed.

    Biases and normalisation parameters get no weight decay unless ``bn_decay`` (NVIDIA's recipe);
    depthwise kernels can be spared too (MobileNet's recipe), decided by the recipe rather than the engine.
    With ``backbone_lr``, the parameters outside ``head`` (ids) form two more groups at that learning rate,
    after the head's two (so ``param_groups[0]`` stays the head's, the one the log shows).
    """
    decay, no_decay, backbone_decay, backbone_no_decay = [], [], [], []
    split = backbone_lr is not None
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
            skip = (name == "bias" or is_norm) and not bn_decay
            skip = skip or (_is_depthwise(module) and not depthwise_decay)
            if split and id(p) not in head:
                (backbone_no_decay if skip else backbone_decay).append(p)
            else:
                (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if split:
        groups += [
            {"params": backbone_decay, "weight_decay": weight_decay, "lr": backbone_lr},
            {"params": backbone_no_decay, "weight_decay": 0.0, "lr": backbone_lr},
        ]
        groups = [g for g in groups if g["params"]]
    return groups


# Optimizers with a fused kernel in torch. Fused, the optimizer reads the GradScaler's scale and inf flag on the
# device (``_step_supports_amp_scaling``), so ``GradScaler.step`` needs no ``.item()``: no host sync per step.
# RMSprop has no fused kernel; with an fp16 GradScaler it syncs once per step (bf16 or fp32 runs have no scaler).
FUSED_OPTIMIZERS = ("sgd", "adamw")


def optimizer_implementation(name: str, device_type: str) -> dict:
    """``fused=True`` on CUDA where torch has the kernel (``foreach`` for RMSprop there), and torch's per-parameter
    loop on the CPU.

    apex's FusedSGD is not used: torch's fused SGD does the same multi-tensor update and also skips the
    scaler's sync, which apex's does not; apex only adds fp16 master weights, which autocast makes unneeded.
    The CPU has no multi-tensor kernels: there ``foreach`` falls back to one kernel per tensor and, in SGD with
    momentum, computes ``grad * -lr`` and friends out of place, a fresh parameter-sized tensor each (66 of them
    per ResNet-18 step, faulted in anew by the allocator every time); the loop updates in place. That cost the
    engine's CPU step 4-10% against a plain loop (issue 17: 0.89 of its images/s at batch 32, 64 px).
    """
    if device_type == "cuda":
        return {"fused": True, "foreach": False} if name in FUSED_OPTIMIZERS else {"foreach": True}
    return {"fused": False, "foreach": False} if name in FUSED_OPTIMIZERS else {"foreach": False}


def build_optimizer(model: nn.Module, cfg, lr: float, spec: ModelSpec | None = None) -> torch.optim.Optimizer:
    """SGD (NVIDIA's recipe), RMSprop (MobileNet's paper) or AdamW, over :func:`parameter_groups`, in the
    implementation :func:`optimizer_implementation` picks for the model's device.

    A ``cfg.backbone_lr_mult`` other than 1 gives the backbone (everything but ``spec.head``) that share of the
    learning rate; the schedule then scales both (LambdaLR multiplies each group's own initial lr).
    """
    mult = getattr(cfg, "backbone_lr_mult", 1.0)
    split = spec is not None and mult != 1.0
    groups = parameter_groups(model, cfg.weight_decay, cfg.bn_weight_decay, cfg.depthwise_weight_decay,
                              head=head_parameter_ids(model, spec) if split else None,
                              backbone_lr=lr * mult if split else None)  # fmt: skip
    impl = optimizer_implementation(cfg.optimizer, next(model.parameters()).device.type)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **impl)
    if cfg.optimizer == "rmsprop":
        # TensorFlow-style RMSprop settings of the MobileNet papers (eps inside the sqrt differs; 0.0316 ~ sqrt(1e-3)).
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=0.0316, momentum=cfg.momentum, **impl)
    return torch.optim.AdamW(groups, lr=lr, **impl)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` keeping this run's implementation flags.

    torch copies a checkpoint's whole param groups, ``fused``/``foreach`` included: a checkpoint from a CPU run
    resumed on a GPU would leave a fused optimizer with ``fused=None``, which then steps on still-scaled
    gradients, and one from a GPU run on a CPU would ask for fused and foreach at once.
    """
    flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags, strict=True):
        group.update(own)


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float, schedule: str,
              lr_steps: list[float], lr_gamma: float, lr_step_every: float | None = None) -> float:  # fmt: skip
    """Multiplier of the base LR at optimizer step ``step``: linear warmup, then cosine, step or linear decay.

    The step schedule multiplies by ``lr_gamma`` at each epoch of ``lr_steps``, or every ``lr_step_every``
    epochs when that is given (torchvision's StepLR: during epoch e the factor is gamma^floor(e / every)).
    """
    epoch = step / max(1, steps_per_epoch)
    if epoch < warmup_epochs:
        # Capped at 1: a warmup that ends between two steps would otherwise overshoot the peak at its last step.
        return min(1.0, (step + 1) / max(1.0, warmup_epochs * steps_per_epoch))
    if schedule == "step":
        if lr_step_every is not None:
            # Counted in steps, not in float epochs, so that a boundary falls on its step exactly.
            return lr_gamma ** math.floor(step / (lr_step_every * steps_per_epoch) + 1e-9)
        return lr_gamma ** sum(epoch >= s for s in lr_steps)
    progress = (epoch - warmup_epochs) / max(1e-8, epochs - warmup_epochs)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1 - progress)


def build_scheduler(optimizer, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule; its state (the step count) is all a checkpoint needs to restore it."""

    def factor(step: int) -> float:
        return lr_factor(step, steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.lr_schedule, cfg.lr_steps,
                         cfg.lr_gamma, getattr(cfg, "lr_step_every", None))  # fmt: skip

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
