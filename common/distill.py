"""Knowledge distillation (``train --teacher CHECKPOINT``): the teacher loaded from one of our checkpoints and checked
against the student's run, the timed teacher forward pass on each training batch, and the resume check.

The teacher is not part of the student's training state: it runs in eval mode without gradients, outside DDP and
the optimizer, and is not saved in the student's checkpoints; its path, alpha and temperature are in the resolved
configuration, which is how a resume knows what the run distilled from. The loss is
:class:`common.losses.DistillationLoss`; ``StepRunner`` calls the :class:`Distiller` inside its autocast.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn as nn

from common.config import DistillConfig, TrainConfig
from common.errors import UserError
from common.inference import TrainedModel, load_trained
from common.losses import DistillationLoss
from common.step import compile_model

log = logging.getLogger("convnets")

SETTINGS = ("distill_alpha", "distill_temperature")  # the loss's settings, besides the teacher itself


class ForwardTimer:
    """Seconds spent in a block, summed until :meth:`reset`. On a GPU the block is timed with CUDA events read only
    when :meth:`seconds` is called (after the loss has been read, so they are done): a host clock around an
    asynchronous launch would time the launch, and a synchronisation per step would stall the pipeline."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total, self.pending, self.began = 0.0, [], 0.0

    def reset(self) -> None:
        self.total, self.pending = 0.0, []

    def __enter__(self):
        if self.cuda:
            self.pending.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.pending[-1][0].record()
        else:
            self.began = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.pending[-1][1].record()
        else:
            self.total += time.perf_counter() - self.began

    def seconds(self) -> float:
        if self.pending:
            self.pending[-1][1].synchronize()  # already done where the loss was read: no wait in practice
            self.total += sum(start.elapsed_time(end) for start, end in self.pending) / 1000
            self.pending = []
        return self.total


class Distiller:
    """The teacher and the loss that mixes its softened outputs into the student's usual loss."""

    def __init__(self, teacher: nn.Module, loss: DistillationLoss, device: torch.device):
        self.teacher, self.loss = teacher, loss
        self.timer = ForwardTimer(device)

    def __call__(self, usual: torch.Tensor, student_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The distillation loss for a batch the student has just seen; call inside the student's autocast.

        ``no_grad`` rather than ``inference_mode``: the teacher's outputs are saved for the loss's backward pass
        (the KL's gradient is the difference of the two softened outputs), which inference tensors cannot be.
        """
        with torch.no_grad(), self.timer:
            teacher_logits = self.teacher(images)
        return self.loss(usual, student_logits, teacher_logits)


def check_teacher(path: str, teacher: TrainedModel, data: str, classes: list[str], num_classes: int,
                  multilabel: bool) -> None:  # fmt: skip
    """Refuse a teacher whose outputs do not mean what the student's mean: another kind of labels (single- or
    multi-label), other class names or another order of them, or another number of outputs.

    Raises:
        UserError: naming the teacher's checkpoint and the difference.
    """
    kinds = ("single-label data (a softmax over classes)", "multi-label data (a sigmoid per label)")
    if teacher.multilabel != multilabel:
        raise UserError(f"--teacher {path} was trained on {kinds[teacher.multilabel]}, the student's {data}/train "
                        f"is {kinds[multilabel]}: a teacher must have the student's kind of labels")  # fmt: skip
    if teacher.classes != list(classes):
        only_teacher = [c for c in teacher.classes if c not in classes]
        only_student = [c for c in classes if c not in teacher.classes]
        if only_teacher or only_student:
            said = "; ".join(f"only {who} has {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
                             for who, names in (("the teacher", only_teacher), ("the student", only_student))
                             if names)  # fmt: skip
        else:
            said = "the same names in another order (its outputs would be matched to the wrong classes)"
        raise UserError(f"--teacher {path} was trained on other classes than {data}/train: {said}")
    outputs = teacher.config["num_classes"]
    if outputs != num_classes:
        raise UserError(f"--teacher {path} has {outputs} outputs and the student {num_classes} (--num-classes): "
                        "the two must give the same number of class scores")  # fmt: skip


def build_distiller(cfg: TrainConfig, data_classes: list[str], num_classes: int, multilabel: bool, image_size: int,
                    device: torch.device) -> Distiller | None:  # fmt: skip
    """The teacher ``cfg.teacher`` names, checked and ready on ``device`` in the student's memory format and compile
    mode, with the loss of ``cfg``'s alpha and temperature; None without ``--teacher``."""
    if cfg.teacher is None:
        defaults = DistillConfig()
        given = [f"--{k.replace('_', '-')}" for k in SETTINGS if getattr(cfg, k) != getattr(defaults, k)]
        if given:
            log.warning("%s without --teacher: no distillation, the setting is not used", " and ".join(given))
        return None
    # The teacher's random initialisation, overwritten by its weights, draws from generators of its own: the
    # student's initialisation and dropout then draw what they draw in the same run without a teacher.
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            trained = load_trained(cfg.teacher, device)
    except UserError as e:
        raise UserError(f"--teacher: {e}") from None
    check_teacher(cfg.teacher, trained, cfg.data, data_classes, num_classes, multilabel)
    teacher = trained.model.eval().requires_grad_(False)
    memory_format = torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format
    teacher = compile_model(teacher.to(memory_format=memory_format), cfg.compile)
    arch, size = trained.config["arch"], trained.config["image_size"]
    log.info("knowledge distillation from %s (%s): loss = %g x the usual + %g x T^2 KL(teacher || student) at T %g",
             cfg.teacher, arch, 1 - cfg.distill_alpha, cfg.distill_alpha, cfg.distill_temperature)  # fmt: skip
    if size != image_size:
        log.info("the teacher was trained at %d px and sees the student's %d px batches", size, image_size)
    return Distiller(teacher, DistillationLoss(cfg.distill_alpha, cfg.distill_temperature, multilabel), device)


def check_resume(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """A run resumes with the distillation it was started with: switching it on or off, or changing alpha or the
    temperature, would change the loss halfway and the run would not end as an uninterrupted one. A teacher at
    another path is taken, with a warning, for the same one moved (a copy on another host).

    Raises:
        UserError: naming the checkpoint and the setting that differs.
    """
    was = saved.get("teacher")  # checkpoints written before distillation existed have none: no teacher
    if (was is None) != (cfg.teacher is None):
        started = f"with --teacher {was}" if was else "without --teacher"
        now = f"--teacher {cfg.teacher}" if cfg.teacher else "no --teacher"
        raise UserError(f"checkpoint {path} was trained {started}, and this command gives {now}: resume with the "
                        "run's own distillation settings, or pass another --output to start afresh")  # fmt: skip
    if was is None:
        return
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(cfg, k)}" for k in SETTINGS
               if saved.get(k) != getattr(cfg, k)]  # fmt: skip
    if changed:
        raise UserError(f"checkpoint {path} was distilled with other settings ({', '.join(changed)}): resume with "
                        "the run's own, or pass another --output to start afresh")  # fmt: skip
    if Path(was).resolve() != Path(cfg.teacher).resolve():
        log.warning("resuming %s with --teacher %s; the run was started with %s: taken for the same model, moved",
                    path, cfg.teacher, was)  # fmt: skip
