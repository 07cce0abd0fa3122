"""The engine: one training step helper, one epoch loop, one evaluation loop, and ``train`` that wires them.

Precision and distribution are wrappers, not branches: autocast and GradScaler are always called with
``enabled=...``; DDP wrapping happens once, and the unwrapped model is what gets saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import distributed as dist
from common.builders import build_model, build_optimizer, build_scheduler
from common.checkpoint import CheckpointManager, atomic_write_text, load_checkpoint, restore_rng, rng_state
from common.config import TrainConfig
from common.data import PipelineSpec, build_data, default_backend
from common.errors import UserError
from common.logger import ProgressBar, RunLogger
from common.registry import ModelSpec, check_width_mult, get_model_spec
from common.telemetry import host_rss_mb

log = logging.getLogger("convnets")


# ----------------------------------------------------------------------------------------------------------
# Resolution of model-dependent defaults


def resolve_sizes(spec: ModelSpec, image_size: int | None, val_resize: int | None) -> tuple[int, int]:
    """(image_size, eval resize): the model's defaults unless given; resize = size / crop_fraction."""
    size = image_size or spec.image_size
    return size, val_resize or int(round(size / spec.crop_fraction))


def pipeline_spec(cfg, image_size: int, resize: int) -> PipelineSpec:
    """What the loaders need from a train or benchmark configuration."""
    return PipelineSpec(image_size, resize, cfg.min_crop_scale, cfg.batch_size, cfg.workers,
                        cfg.memory_format == "channels_last", cfg.seed)  # fmt: skip


def autocast_context(device: torch.device, enabled: bool, dtype: str):
    return torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=enabled)


def resolve_amp(amp: bool | None, device: torch.device) -> bool:
    """``--amp`` as given, else on for CUDA (as NVIDIA's recipes train) and off on CPU, where autocast is
    slower than fp32 on cores without bf16 units."""
    return device.type == "cuda" if amp is None else amp


# ----------------------------------------------------------------------------------------------------------
# One optimizer step


class StepRunner:
    """Forward and backward under autocast; every ``accumulation`` micro-batches: unscale, clip, step, update.

    The loss is divided by ``accumulation`` so accumulated gradients equal those of one large batch, and
    DDP's all-reduce is skipped (``no_sync``) on all but the last micro-batch.
    """

    def __init__(self, model, optimizer, scheduler, scaler, criterion, accumulation: int, clip: float | None,
                 amp: bool, amp_dtype: str, mixup: float, ema=None):  # fmt: skip
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.criterion, self.accumulation, self.clip = criterion, accumulation, clip
        self.amp, self.amp_dtype, self.mixup, self.ema = amp, amp_dtype, mixup, ema
        self.micro_step = 0

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast_context(images.device, self.amp, self.amp_dtype):
            if self.mixup > 0:
                # Rolling the batch by one pairs every image with another at no shuffling cost.
                lam = float(np.random.beta(self.mixup, self.mixup))
                images = images.mul(lam).add_(images.roll(1, 0), alpha=1 - lam)
                out = self.model(images)
                return lam * self.criterion(out, labels) + (1 - lam) * self.criterion(out, labels.roll(1, 0))
            return self.criterion(self.model(images), labels)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Run one micro-batch; returns (loss, whether an optimizer step was taken)."""
        self.micro_step += 1
        boundary = self.micro_step % self.accumulation == 0
        sync = nullcontext() if boundary or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            loss = self.loss(images, labels)
            self.scaler.scale(loss / self.accumulation).backward()
        if boundary:
            if self.clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(unwrap(self.model))
        return loss.detach(), boundary


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers: what gets saved and evaluated."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------------------
# Loops


def train_one_epoch(step: StepRunner, loader, epoch: int, logger: RunLogger, print_freq: int,
                    max_steps: int | None, world: int) -> dict:  # fmt: skip
    """Train one epoch; returns the epoch's mean loss, throughput and timing."""
    step.model.train()
    loader.set_epoch(epoch)
    total = min(len(loader), max_steps or len(loader))
    bar = ProgressBar(total, f"epoch {epoch}", logger.enabled)
    # The loss is summed on the device and read back only when a line is logged: a .item() every step
    # would make the host wait for the GPU and lose the overlap of data loading with compute.
    loss_sum = 0.0  # becomes a float64 tensor on the loss's device at the first step
    seen, data_time, start = 0, 0.0, time.perf_counter()
    window_start, window_images = start, 0
    end = start
    i, shown = 0, ""
    for i, (images, labels) in enumerate(loader, 1):
        data_time += time.perf_counter() - end
        try:
            loss, _ = step(images, labels)
        except ValueError as e:
            if "Expected more than 1 value per channel" not in str(e):
                raise
            raise UserError(
                f"a training batch of {labels.shape[0]} image(s) leaves BatchNorm a single value per channel "
                "(the model's last feature map is 1x1): use --batch-size 2 or more"
            ) from None
        loss_sum = loss_sum + loss.double()
        seen += labels.shape[0]
        window_images += labels.shape[0]
        if i % print_freq == 0 or i == total:
            value = loss.item()  # waits for the GPU: the window's images/s below are then computed ones
            now = time.perf_counter()
            logger.log(
                (epoch, i),
                {
                    "train.loss": value,
                    "train.lr": step.optimizer.param_groups[0]["lr"],
                    "train.total_ips": window_images * world / (now - window_start),
                    "train.data_time": data_time / i,
                },
                echo=not bar.enabled,
            )
            window_start, window_images, shown = now, 0, f"loss {value:.4f}"
        bar.update(i, shown)
        end = time.perf_counter()
        if max_steps and i >= max_steps:
            # Only a cut epoch stops early: a loader run to its end keeps its pipeline for the next epoch.
            break
    bar.close()
    elapsed = time.perf_counter() - start
    if i == 0:
        raise UserError("the training set yields no full batch: lower --batch-size or add images")
    # The epoch's loss is the mean over every rank's micro-batches, as one process would have logged it.
    loss_mean = dist.all_reduce_sum(loss_sum.cpu() / i) / world
    return {
        "train.loss": loss_mean.item(),
        "train.total_ips": seen * world / elapsed,
        "train.data_time": data_time / i,
        "train.epoch_time": elapsed,
    }


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    count: int
    confusion: torch.Tensor  # [true, predicted] counts
    latencies_ms: list[float]

    def metrics(self, prefix: str) -> dict:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            f"{prefix}.loss": self.loss,
            f"{prefix}.top1": self.top1,
            f"{prefix}.top5": self.top5,
            f"{prefix}.compute_latency_mean": float(lat.mean()) / 1000,
            f"{prefix}.compute_latency_at99": float(np.percentile(lat, 99)) / 1000,
        }


def batch_metrics(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, top-1 hits, top-k hits, count) as one float64 tensor, and the top-1 predictions; both
    on the logits' device, so a batch costs one transfer."""
    topk = logits.topk(k, dim=1).indices
    correct = topk.eq(labels.view(-1, 1))
    loss = F.cross_entropy(logits, labels, reduction="sum")
    count = torch.tensor(labels.numel(), dtype=torch.float64, device=logits.device)
    sums = torch.stack([loss.double(), correct[:, 0].sum().double(), correct.any(1).sum().double(), count])
    return sums, topk[:, 0]


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, amp: bool = False, amp_dtype: str = "float16") -> EvalResult:
    """Loss, top-1/top-5 (percent) and the confusion matrix, summed over ranks."""
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    latencies = []
    for images, labels in loader:
        start = time.perf_counter()
        with autocast_context(images.device, amp, amp_dtype):
            logits = model(images).float()
        batch, top1 = batch_metrics(logits, labels, k)
        batch = batch.cpu()  # waits for the device, so the latency below is the batch's compute time
        latencies.append((time.perf_counter() - start) * 1000)
        sums += batch
        confusion += torch.bincount((labels * num_classes + top1).cpu(), minlength=num_classes**2)
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(confusion)
    n = max(1.0, sums[3].item())
    return EvalResult(
        loss=sums[0].item() / n,
        top1=100 * sums[1].item() / n,
        top5=100 * sums[2].item() / n,
        count=int(sums[3].item()),
        confusion=confusion.view(num_classes, num_classes),
        latencies_ms=latencies,
    )


# ----------------------------------------------------------------------------------------------------------
# Run set-up


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    import random

    random.seed(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


def checkpoint_state(model, optimizer, scheduler, scaler, ema, epoch, step, config: dict, classes, best,
                     rngs: list[dict]) -> dict:  # fmt: skip
    """A dict of component state_dicts plus what a resume and a later evaluate/predict need."""
    return {
        "format": "convnets-checkpoint-v1",
        "arch": config["arch"],
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": epoch,
        "step": step,
        "best_top1": best,
        "rng": rngs,  # one entry per rank
        "config": config,  # resolved: image size, resize, classes count, backend, world size...
        "class_names": list(classes),
    }


def train(cfg: TrainConfig) -> dict:
    """Run a full training as ``cfg`` describes; returns the final validation metrics (rank 0)."""
    spec = get_model_spec(cfg.arch)
    check_width_mult(spec, cfg.width_mult)
    if cfg.gpu_affinity:
        # Before the process group and the loaders start their threads: they inherit the mask.
        dist.set_gpu_affinity(dist.local_rank())
    rt = dist.init_distributed()
    cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, rt.device))
    seed_everything(cfg.seed, rt.rank, cfg.deterministic)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32

    output = Path(cfg.output or f"runs/{cfg.arch}")
    backend = cfg.data_backend or default_backend(rt.device)
    image_size, resize = resolve_sizes(spec, cfg.image_size, cfg.val_resize)
    world = rt.world_size
    optimizer_batch = cfg.optimizer_batch_size or cfg.batch_size * world
    if optimizer_batch % (cfg.batch_size * world):
        raise UserError(
            f"--optimizer-batch-size {optimizer_batch} is not a multiple of --batch-size x processes "
            f"({cfg.batch_size} x {world})"
        )
    accumulation = optimizer_batch // (cfg.batch_size * world)
    pipe = pipeline_spec(cfg, image_size, resize)
    data = build_data(cfg, backend, pipe, rt.device, rt.rank, world)
    num_classes = cfg.num_classes or len(data.classes)
    if num_classes < len(data.classes):
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(data.classes)} class folders")

    model = build_model(spec, num_classes, cfg.width_mult, cfg.pretrained, cfg.freeze_backbone)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format
    model = model.to(rt.device, memory_format=memory_format)
    lr = cfg.lr * optimizer_batch / 256
    optimizer = build_optimizer(model, cfg, lr)
    steps_per_epoch = min(len(data.train), cfg.max_steps_per_epoch or len(data.train)) // accumulation
    if steps_per_epoch == 0:
        raise UserError(f"an epoch has fewer batches ({len(data.train)}) than gradient accumulation ({accumulation})")
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    fp16 = cfg.amp and cfg.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(rt.device.type, enabled=fp16)
    ema = None
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)

    ckpts = CheckpointManager(output, cfg.keep_last)
    start_epoch, best, global_step = 0, 0.0, 0
    resumed = _load_resume(cfg, ckpts, data.classes)
    if resumed is not None:
        state, path = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the checkpoint ran without fp16: the fresh scaler then starts anew
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best, global_step = state["epoch"] + 1, state["best_top1"], state["step"]
        restore_rng(state["rng"], rt.rank, world, cfg.seed + 1000 * start_epoch)
        log.info("resumed from %s at epoch %d", path, start_epoch)
        if start_epoch >= cfg.epochs:
            log.info("the run already has its %d epochs; raise --epochs to train further", cfg.epochs)

    train_model = model
    if world > 1:
        ddp_kwargs = {"device_ids": [rt.device.index]} if rt.device.type == "cuda" else {}
        train_model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if cfg.compile:
        train_model = torch.compile(train_model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step = StepRunner(train_model, optimizer, scheduler, scaler, criterion, accumulation, cfg.clip_grad_norm,
                      cfg.amp, cfg.amp_dtype, cfg.mixup, ema)  # fmt: skip

    logger = RunLogger(output / "log.json", enabled=rt.is_main)
    resolved = {**dataclasses.asdict(cfg), "output": str(output), "data_backend": backend, "image_size": image_size,
                "val_resize": resize, "num_classes": num_classes, "world_size": world, "accumulation": accumulation,
                "effective_lr": lr, "optimizer_batch_size": optimizer_batch, "device": str(rt.device)}  # fmt: skip
    if rt.is_main:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "config.json", json.dumps(resolved, indent=2))
        logger.metadata("config", resolved)
        log.info(
            "training %s on %s: %d classes, %d train batches/epoch of %d x %d processes, lr %.4g, backend %s",
            cfg.arch, rt.device, num_classes, len(data.train), cfg.batch_size, world, lr, backend,
        )  # fmt: skip

    final: dict = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            metrics = train_one_epoch(step, data.train, epoch, logger, cfg.print_freq,
                                      cfg.max_steps_per_epoch, world)  # fmt: skip
            global_step += steps_per_epoch
            metrics["train.rss_mb"] = host_rss_mb()
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                result = evaluate(model, data.val, num_classes, cfg.amp, cfg.amp_dtype)
                metrics.update(result.metrics("val"))
                if ema is not None:
                    metrics.update(
                        evaluate(ema.module, data.val, num_classes, cfg.amp, cfg.amp_dtype).metrics("val_ema")
                    )
            is_best = metrics.get("val.top1", -1.0) > best
            best = max(best, metrics.get("val.top1", best))
            logger.log((epoch,), metrics)
            final = metrics
            rngs = dist.all_gather_object(rng_state())  # every rank's generators, so each resumes its own
            if rt.is_main:
                state = checkpoint_state(model, optimizer, scheduler, scaler, ema, epoch, global_step, resolved,
                                         data.classes, best, rngs)  # fmt: skip
                ckpts.save(state, epoch, is_best)
            dist.barrier()
        if rt.is_main and final:
            logger.log(tuple(), {k: v for k, v in final.items() if k.startswith("val")} | {"val.best_top1": best})
    finally:
        logger.close()
        dist.cleanup()
    return final


def _load_resume(cfg: TrainConfig, ckpts: CheckpointManager, classes: list[str]):
    """The checkpoint to resume from (None for a fresh run), checked against this run's classes.

    A fresh start never happens over an earlier run's checkpoints: it would replace best.pt and rotate the
    epoch checkpoints away.
    """
    earlier_best = (ckpts.folder / "best.pt").exists()
    if not cfg.resume:
        if ckpts.epoch_files() or earlier_best:
            raise UserError(
                f"{ckpts.folder} holds the checkpoints of an earlier run: pass --resume auto to continue it, or "
                "another --output to start afresh"
            )
        return None
    if cfg.resume == "auto":
        found = ckpts.load_latest()
        if found is None and earlier_best:
            raise UserError(
                f"--resume auto: {ckpts.folder} holds an earlier run's best.pt but no epoch checkpoint that loads; "
                "pass another --output to start afresh"
            )
        if found is None:
            log.info("--resume auto: no checkpoint in %s, starting from scratch", ckpts.folder)
            return None
    else:
        found = (load_checkpoint(cfg.resume), Path(cfg.resume))
    state, path = found
    if state.get("arch") != cfg.arch:
        raise UserError(f"checkpoint {path} is a {state.get('arch')}, not --arch {cfg.arch}")
    if state.get("class_names") != list(classes):
        raise UserError(f"checkpoint {path} was trained on other classes than {cfg.data}/train")
    return state, path
