"""The engine: the epoch loop and ``train``, which reads as the run's named steps; the optimizer step lives in
``common/step.py`` and evaluation in ``common/evaluation.py``.

Precision and distribution are wrappers, not branches: autocast and GradScaler are always called with
``enabled=...``; DDP wrapping happens once, and the unwrapped model is what gets saved.

Nothing in a training step waits for the GPU: the optimizer is fused (the GradScaler's inf check stays on the
device), the loss is summed on the device and read only when a line is logged, and evaluation accumulates its
counts on the device and reads them once (``tests/test_gpu.py`` runs steps under CUDA's sync debug mode).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common import distributed as dist
from common.atomic import ensure_writable
from common.builders import BackboneStages, build_model
from common.checkpoint import CheckpointManager, atomic_write_text, load_checkpoint, restore_rng, rng_state
from common.config import TrainConfig
from common.data import DataBundle, PipelineSpec, build_data, default_backend
from common.data.spec import Augmentation
from common.distill import build_distiller, check_resume
from common.errors import UserError
from common.evaluation import evaluate, evaluate_multilabel
from common.logger import ProgressBar, RunLogger
from common.losses import build_criterion
from common.registry import ModelSpec, check_width_mult, get_model_spec
from common.step import (
    Optimization,
    Precision,
    StepRunner,
    build_optimization,
    compile_model,
    resolve_amp,
    unwrap,
)
from common.target import TimeToTarget
from common.telemetry import host_rss_mb, run_environment, system_metrics
from common.tracking import open_tracker, run_tags

log = logging.getLogger("convnets")


# ----------------------------------------------------------------------------------------------------------
# Resolution of model-dependent defaults


def resolve_sizes(spec: ModelSpec, image_size: int | None, val_resize: int | None) -> tuple[int, int]:
    """(image_size, eval resize): the model's defaults unless given; resize = size / crop_fraction."""
    size = image_size or spec.image_size
    return size, val_resize or int(round(size / spec.crop_fraction))


def pipeline_spec(cfg, image_size: int, resize: int) -> PipelineSpec:
    """What the loaders need from a train or benchmark configuration (``cfg.amp`` already resolved): under fp16
    AMP the loaders yield float16, which the first convolution would cast to anyway."""
    augment = Augmentation(**{f: getattr(cfg, f) for f in Augmentation.__dataclass_fields__ if hasattr(cfg, f)})
    return PipelineSpec(image_size, resize, cfg.min_crop_scale, cfg.batch_size, cfg.workers,
                        cfg.memory_format == "channels_last", cfg.seed,
                        half=bool(cfg.amp) and cfg.amp_dtype == "float16", augment=augment)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Loops


def train_one_epoch(step: StepRunner, loader, epoch: int, logger: RunLogger, print_freq: int,
                    max_steps: int | None, world: int, stages: BackboneStages | None = None) -> dict:  # fmt: skip
    """Train one epoch; returns the epoch's mean loss, throughput and timing."""
    step.model.train()
    if stages is not None:
        stages.apply(epoch)  # after train(): a frozen backbone's BatchNorm goes back to eval mode
    loader.set_epoch(epoch)
    teacher_timer = step.distiller.timer if step.distiller is not None else None  # --teacher: its forward time
    if teacher_timer is not None:
        teacher_timer.reset()
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
                    **({"train.teacher_time": teacher_timer.seconds() / i} if teacher_timer is not None else {}),
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
        **({"train.teacher_time": teacher_timer.seconds() / i} if teacher_timer is not None else {}),
        "train.epoch_time": elapsed,
    }


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


def checkpoint_state(model: nn.Module, opt: Optimization, epoch: int, step: int, config: dict, classes, best: float,
                     rngs: list[dict]) -> dict:  # fmt: skip
    """A dict of component state_dicts plus what a resume and a later evaluate/predict need."""
    return {
        "format": "convnets-checkpoint-v1",
        "arch": config["arch"],
        "model": unwrap(model).state_dict(),
        **opt.state_dict(),  # optimizer, scheduler, scaler, ema
        "epoch": epoch,
        "step": step,
        "best_top1": best,
        "rng": rngs,  # one entry per rank
        "config": config,  # resolved: image size, resize, classes count, backend, world size...
        "class_names": list(classes),
    }


@dataclass
class RunPlan:
    """What the configuration resolves to on this machine, before any data or model is built."""

    output: Path
    backend: str
    image_size: int
    resize: int
    optimizer_batch: int
    accumulation: int
    lr: float


@dataclass
class Progress:
    """Where the run stands: the next epoch, the best top-1 so far, the optimizer steps taken, and what the resumed
    checkpoint kept for the tracking sinks (the MLflow run) and the time to target (``saved``)."""

    start_epoch: int = 0
    best: float = 0.0
    global_step: int = 0
    saved: dict = field(default_factory=dict)
    target: TimeToTarget = field(default_factory=lambda: TimeToTarget(None, None))


def set_up_runtime(cfg: TrainConfig, rt: dist.Runtime) -> TrainConfig:
    """AMP resolved for the device, seeds, cuDNN and TF32 settings; returns the configuration with AMP set."""
    cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, rt.device))
    seed_everything(cfg.seed, rt.rank, cfg.deterministic)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    return cfg


def plan_run(cfg: TrainConfig, spec: ModelSpec, rt: dist.Runtime) -> RunPlan:
    """Output folder, data backend, image sizes, and the optimizer batch with the accumulation that reaches it."""
    world = rt.world_size
    optimizer_batch = cfg.optimizer_batch_size or cfg.batch_size * world
    if optimizer_batch % (cfg.batch_size * world):
        raise UserError(
            f"--optimizer-batch-size {optimizer_batch} is not a multiple of --batch-size x processes "
            f"({cfg.batch_size} x {world})"
        )
    image_size, resize = resolve_sizes(spec, cfg.image_size, cfg.val_resize)
    return RunPlan(
        output=Path(cfg.output or f"runs/{cfg.arch}"),
        backend=cfg.data_backend or default_backend(rt.device),
        image_size=image_size,
        resize=resize,
        optimizer_batch=optimizer_batch,
        accumulation=optimizer_batch // (cfg.batch_size * world),
        lr=cfg.lr * optimizer_batch / 256,
    )


def positive_index(name: str | None, classes: list[str]) -> int | None:
    """The index of ``--positive-class`` among the class folders (None when not given)."""
    if name is None:
        return None
    if name not in classes:
        raise UserError(f"--positive-class {name!r} is not one of the class folders: {', '.join(classes)}")
    return classes.index(name)


def count_classes(cfg: TrainConfig, data: DataBundle) -> int:
    num_classes = cfg.num_classes or len(data.classes)
    if data.multilabel and num_classes != len(data.classes):
        raise UserError(f"--num-classes {num_classes}: multi-label data has {len(data.classes)} labels, and the "
                        "sigmoid head needs one output per label")  # fmt: skip
    if data.multilabel and cfg.positive_class:
        raise UserError("--positive-class is for single-label data; multi-label runs report AP and F1 per label")
    if num_classes < len(data.classes):
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(data.classes)} class folders")
    return num_classes


def build_train_model(cfg: TrainConfig, spec: ModelSpec, num_classes: int, rt: dist.Runtime) -> nn.Module:
    """The registered model (pretrained, frozen, SyncBatchNorm as asked) on the device in its memory format."""
    model = build_model(spec, num_classes, cfg.width_mult, cfg.pretrained, cfg.freeze_backbone)
    if cfg.sync_bn and rt.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format
    return model.to(rt.device, memory_format=memory_format)


def steps_per_epoch(cfg: TrainConfig, data: DataBundle, accumulation: int) -> int:
    steps = min(len(data.train), cfg.max_steps_per_epoch or len(data.train)) // accumulation
    if steps == 0:
        raise UserError(f"an epoch has fewer batches ({len(data.train)}) than gradient accumulation ({accumulation})")
    return steps


def resume(cfg: TrainConfig, ckpts: CheckpointManager, classes: list[str], model: nn.Module, opt: Optimization,
           rt: dist.Runtime) -> Progress:  # fmt: skip
    """Load the checkpoint ``--resume`` names into the model and optimization, or start afresh."""
    resumed = _load_resume(cfg, ckpts, classes)
    if resumed is None:
        return Progress()
    state, path = resumed
    model.load_state_dict(state["model"])
    opt.load_state_dict(state)
    # Checkpoints written before tracking and --target-* have none of these entries.
    saved = {k: state[k] for k in ("tracking", "elapsed_s", "target") if k in state}
    progress = Progress(state["epoch"] + 1, state["best_top1"], state["step"], saved)
    restore_rng(state["rng"], rt.rank, rt.world_size, cfg.seed + 1000 * progress.start_epoch)
    log.info("resumed from %s at epoch %d", path, progress.start_epoch)
    if progress.start_epoch >= cfg.epochs:
        log.info("the run already has its %d epochs; raise --epochs to train further", cfg.epochs)
    return progress


def wrap(model: nn.Module, cfg: TrainConfig, rt: dist.Runtime) -> tuple[nn.Module, nn.Module]:
    """(training model, evaluation model): DDP for more than one process, then torch.compile in ``cfg.compile``'s
    mode for both. Evaluation runs each rank's own shard on the unwrapped model: no DDP there."""
    train_model = model
    if rt.world_size > 1:
        ddp_kwargs = {"device_ids": [rt.device.index]} if rt.device.type == "cuda" else {}
        train_model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if cfg.compile and rt.is_main:
        log.info("torch.compile mode %s for training and evaluation", cfg.compile)
    return compile_model(train_model, cfg.compile), compile_model(model, cfg.compile)


def write_run_config(cfg: TrainConfig, plan: RunPlan, data: DataBundle, num_classes: int, rt: dist.Runtime,
                     logger: RunLogger) -> dict:  # fmt: skip
    """The resolved configuration: written to config.json, the log and every checkpoint."""
    resolved = {**dataclasses.asdict(cfg), "output": str(plan.output), "data_backend": plan.backend,
                "image_size": plan.image_size, "val_resize": plan.resize, "num_classes": num_classes,
                "world_size": rt.world_size, "accumulation": plan.accumulation, "effective_lr": plan.lr,
                "optimizer_batch_size": plan.optimizer_batch, "device": str(rt.device),
                "multilabel": data.multilabel}  # fmt: skip
    if rt.is_main:
        plan.output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan.output / "config.json", json.dumps(resolved, indent=2))
        logger.metadata("config", resolved)
        environment = run_environment()  # beside the configuration: a resume on another host writes its own
        atomic_write_text(plan.output / "environment.json", json.dumps(environment, indent=2))
        logger.metadata("environment", environment)
    return resolved


def train(cfg: TrainConfig) -> dict:
    """Run a full training as ``cfg`` describes; returns the final validation metrics (rank 0)."""
    spec = get_model_spec(cfg.arch)
    check_width_mult(spec, cfg.width_mult)
    if cfg.gpu_affinity:
        # Before the process group and the loaders start their threads: they inherit the mask.
        dist.set_gpu_affinity(dist.local_rank())
    rt = dist.init_distributed(cfg.device)
    cfg = set_up_runtime(cfg, rt)
    plan = plan_run(cfg, spec, rt)
    if rt.is_main:  # before the image check and the data loaders, which take minutes on a large data set
        ensure_writable(plan.output, "the run")
    data = build_data(cfg, plan.backend, pipeline_spec(cfg, plan.image_size, plan.resize), rt.device, rt.rank,
                      rt.world_size)  # fmt: skip
    num_classes = count_classes(cfg, data)
    positive = positive_index(cfg.positive_class, data.classes)
    distiller = build_distiller(cfg, data.classes, num_classes, data.multilabel, plan.image_size, rt.device)
    model = build_train_model(cfg, spec, num_classes, rt)
    precision = Precision(cfg.amp, cfg.amp_dtype)
    opt = build_optimization(model, cfg, plan.lr, steps_per_epoch(cfg, data, plan.accumulation), precision,
                             plan.accumulation, spec)  # fmt: skip
    ckpts = CheckpointManager(plan.output, cfg.keep_last)
    progress = resume(cfg, ckpts, data.classes, model, opt, rt)
    progress.target = TimeToTarget.from_config(cfg, data.multilabel, progress.saved)
    stages = BackboneStages(model, spec, cfg.freeze_backbone_epochs) if cfg.freeze_backbone_epochs else None
    if stages is not None:
        # Before DDP wraps the model: DDP reduces the gradients of the parameters that require them at that time.
        stages.apply(progress.start_epoch)
        if rt.is_main:
            log.info("two-stage fine-tuning: the head alone for %d epoch(s), then the whole network (backbone lr x %g)",
                     cfg.freeze_backbone_epochs, cfg.backbone_lr_mult)  # fmt: skip
    train_model, eval_model = wrap(model, cfg, rt)
    criterion = build_criterion(data.multilabel, data.class_counts, data.train_images, num_classes,
                                cfg.label_smoothing, cfg.balance, rt.device)  # fmt: skip
    step = StepRunner(train_model, criterion, opt, precision, cfg.mixup, cuda_graphs=cfg.compile == "reduce-overhead",
                      distiller=distiller)  # fmt: skip

    batches = min(len(data.train), cfg.max_steps_per_epoch or len(data.train))  # the tracking sinks' step unit
    tracker = None  # only rank 0 writes, on one node or many
    if rt.is_main:
        tracker = open_tracker(cfg, plan.output, batches, progress.saved.get("tracking"), progress.start_epoch > 0)
    logger = RunLogger(plan.output / "log.json", enabled=rt.is_main, tracker=tracker)
    resolved = write_run_config(cfg, plan, data, num_classes, rt, logger)
    logger.metadata("tags", run_tags(resolved, spec.recipe, data.train_images))
    if rt.is_main:
        log.info(
            "training %s on %s: %d %s, %d train batches/epoch of %d x %d processes, lr %.4g, backend %s",
            cfg.arch, rt.device, num_classes, "labels (multi-label, sigmoid)" if data.multilabel else "classes",
            len(data.train), cfg.batch_size, rt.world_size, plan.lr, plan.backend,
        )  # fmt: skip
    status = "FAILED"  # what the tracking sinks record as the run's end
    try:
        final = run_epochs(cfg, step, eval_model, data, num_classes, progress, ckpts, resolved, logger, rt, stages,
                           positive)  # fmt: skip
        status = "FINISHED"
        return final
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.close(status, plan.output / "log.json")
        dist.cleanup()


def run_epochs(cfg: TrainConfig, step: StepRunner, eval_model: nn.Module, data: DataBundle, num_classes: int,
               progress: Progress, ckpts: CheckpointManager, resolved: dict, logger: RunLogger, rt: dist.Runtime,
               stages: BackboneStages | None = None, positive: int | None = None) -> dict:  # fmt: skip
    """The epoch loop: train, evaluate when due, log, checkpoint; returns the last epoch's metrics."""
    opt, precision = step.opt, step.precision
    model = unwrap(step.model)
    best, global_step = progress.best, progress.global_step
    epoch_steps = steps_per_epoch(cfg, data, opt.accumulation)
    final: dict = {}
    evaluator = evaluate_multilabel if data.multilabel else functools.partial(evaluate, positive=positive)
    target, result = progress.target, None
    if target.reached is not None and rt.is_main:
        log.info("the checkpoint reached the target %s %g%% at epoch %d: nothing to train", target.metric,
                 target.value, target.reached["epoch"])  # fmt: skip
    target.start()
    for epoch in range(progress.start_epoch, cfg.epochs if target.reached is None else 0):
        if stages is not None and epoch == stages.freeze_epochs and epoch > progress.start_epoch:
            # Stage 2: the backbone trains again. DDP and torch.compile wrapped the model with a frozen backbone
            # (DDP would never reduce its gradients), so wrap it anew.
            stages.apply(epoch)
            step.model, eval_model = wrap(model, cfg, rt)
            if rt.is_main:
                log.info("epoch %d: stage 2, the whole network trains", epoch)
        with system_metrics(rt.device, rt.is_main) as system:  # GPU utilisation, memory, power (NVML)
            metrics = train_one_epoch(step, data.train, epoch, logger, cfg.print_freq, cfg.max_steps_per_epoch,
                                      rt.world_size, stages)  # fmt: skip
        global_step += epoch_steps
        metrics["train.rss_mb"] = host_rss_mb()
        metrics.update(system)
        result = None
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            result = evaluator(eval_model, data.val, num_classes, precision)
            metrics.update(result.metrics("val"))
            if opt.ema is not None:  # evaluated eagerly: compiling a second model would double compile time
                metrics.update(evaluator(opt.ema.module, data.val, num_classes, precision).metrics("val_ema"))
            metrics.update(target.check(epoch, result.score))  # the same score on every rank: all stop together
        # The best checkpoint is the one with the best top-1, or mAP for multi-label data.
        is_best = result is not None and result.score > best
        best = max(best, result.score) if result is not None else best
        logger.log((epoch,), metrics)
        final = metrics
        rngs = dist.all_gather_object(rng_state())  # every rank's generators, so each resumes its own
        if rt.is_main:
            state = checkpoint_state(model, opt, epoch, global_step, resolved, data.classes, best, rngs)
            if result is not None and data.multilabel:
                # Tuned on the validation set at this epoch: predict and evaluate on a test split use them.
                state["thresholds"] = result.thresholds
            state.update(target.state(), tracking=logger.tracking_state())
            ckpts.save(state, epoch, is_best)
        dist.barrier()
        if target.reached is not None:
            if rt.is_main:
                log.info("target %s %g%% reached at epoch %d after %.1f s of training: stopping", target.metric,
                         target.value, epoch, target.reached["seconds"])  # fmt: skip
            break
    if rt.is_main and final:
        best_name = "val.best_map" if data.multilabel else "val.best_top1"
        logger.log(tuple(), {k: v for k, v in final.items() if k.startswith(("val", "target"))} | {best_name: best})
        hand_artifacts(logger, ckpts.folder, result, data.classes, resolved["arch"])
    return final


def hand_artifacts(logger: RunLogger, output: Path, result, classes: list[str], arch: str) -> None:
    """The run's files for the tracking sinks: config.json, the last evaluation's confusion matrix (single-label;
    drawn only when a sink takes it) and best.pt (which the MLflow sink logs as a model when asked)."""
    if logger.tracker is None:
        return
    logger.artifact(output / "config.json")
    if result is not None and hasattr(result, "confusion"):
        from common.inference import save_confusion_png

        n = len(classes)
        path = output / "confusion_matrix.png"
        save_confusion_png(result.confusion[:n, :n], classes, path, f"{arch}: validation top-1 {result.top1:.2f}%")
        logger.artifact(path)
    logger.artifact(output / "best.pt")


# Settings a resumed run takes from its checkpoint's optimizer and schedule state, whatever the command says
# (--epochs is not among them: raising it is how a finished run trains further; nor is the warmup, which a
# preset's schedule fitting scales with --epochs).
RESUME_KEEPS = ("batch_size", "lr", "optimizer", "momentum", "weight_decay", "lr_schedule")


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
    check_resume(state.get("config", {}), cfg, path)
    changed = {k: (state["config"].get(k), v) for k, v in dataclasses.asdict(cfg).items()
               if k in RESUME_KEEPS and k in state.get("config", {}) and state["config"][k] != v}  # fmt: skip
    if changed:
        # The optimizer, schedule and scaler come back as saved: these settings of this command are not the run's.
        log.warning("resuming %s, which was started with other settings; the run keeps its own optimizer and schedule "
                    "state: %s (remove the checkpoints or pass another --output to train with the new ones)", path,
                    ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))  # fmt: skip
    return state, path
