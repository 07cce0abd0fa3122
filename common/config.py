"""Typed configuration: one dataclass per command, turned into argparse options and read from preset files.

Precedence is built-in defaults < recipe preset (a TOML file, optionally one of its profiles) < command line.
The resolved configuration is written beside every run's outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, which many NGC containers still ship: the same parser, as a package
    import tomli as tomllib

from common.errors import UserError

log = logging.getLogger("convnets")

BACKENDS = ("dali-gpu", "dali-cpu", "pytorch", "synthetic")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# A run shorter than its recipe gets the recipe's warmup scaled to it, and never more than this share of it.
# The published recipes stay below: NVIDIA's ResNet-50 warms up 8 of 90 epochs (8.9%), ResNet-18's Fashion-MNIST
# profile 0.5 of 4 (12.5%), so they run exactly as written; what is left (at least 4/5 of a run) anneals.
MAX_WARMUP_SHARE = 0.2
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes


def opt(default, help: str, choices=None, **extra):
    """A dataclass field carrying its command-line help and choices.

    ``extra`` goes to the field's metadata: ``required=True`` (an option that must be given), ``positional="+"``
    or ``"?"`` (an argument without a flag, with that nargs), ``flag="--list"`` (a flag other than the name's).
    """
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "choices": choices, **extra}, **kwargs)


def same_as(cls, name: str, default=dataclasses.MISSING, help: str | None = None):
    """Field ``name`` of ``cls`` again (default, help, choices), for a command that shares the option."""
    f = cls.__dataclass_fields__[name]
    if default is dataclasses.MISSING:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    meta = dict(f.metadata)
    own_help = meta.pop("help")  # popped in any case: ``help`` must not reach opt() twice
    return opt(default, help or own_help, meta.pop("choices"), **meta)


def default_workers(max_workers: int = 16) -> int:
    """Data workers per rank: the cores this process may run on (a container's or Slurm's CPU set, not the whole
    machine), shared among the ranks torchrun starts on this node, so that 8 ranks of a DGX do not each start a
    thread per core. Capped: beyond 16 decode threads a GPU's pipeline gains nothing."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(max_workers, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


@dataclass
class DeviceConfig:
    device: str = opt(
        "auto",
        "where to run: auto (CUDA when usable, else the CPU, with a warning where NVIDIA GPUs are present but "
        "unusable), cuda (stop when CUDA is not usable), cpu; cuda:N picks one GPU (default: auto)",
    )


@dataclass
class DataConfig:
    data: str = opt(
        os.environ.get("DATA_DIR", "/data/imagenet"),
        "ImageFolder root holding train/<class>/* and val/<class>/* (default: $DATA_DIR or /data/imagenet)",
    )
    data_backend: str | None = opt(None, "data pipeline (default: dali-gpu with a GPU, dali-cpu without)", BACKENDS)
    workers: int = opt(
        default_workers(),
        "decode threads (DALI) or worker processes (pytorch) per rank (default: this node's usable cores shared "
        "among its ranks, at most 16)",
    )
    image_size: int | None = opt(None, "training and eval resolution (default: the model's)")
    val_resize: int | None = opt(None, "shorter side before the eval center crop (default: image_size * 256/224)")
    min_crop_scale: float = opt(0.08, "smallest area fraction of RandomResizedCrop")
    image_check: str = opt(
        "auto",
        "check images at start-up: full decode, header only, none, or auto (full when cheap)",
        ("auto", "full", "header", "none"),
    )
    skip_bad_images: bool = opt(False, "leave undecodable images out (with one warning) instead of stopping")


@dataclass
class ModelConfig:
    arch: str = opt("resnet50", "registered model name (`convnets info --list`)")
    num_classes: int | None = opt(None, "classifier size (default: the number of class folders)")
    width_mult: float | None = opt(None, "width multiplier, for the models that have one")
    pretrained: str | None = opt(None, "torchvision weights name (e.g. IMAGENET1K_V2) or a local checkpoint file")
    freeze_backbone: bool = opt(False, "train only the classifier head")


@dataclass
class PrecisionConfig:
    amp: bool | None = opt(
        None, "automatic mixed precision; unset: on with a CUDA GPU, off on CPU (where autocast can be slower)"
    )
    amp_dtype: str = opt("float16", "autocast dtype; float16 uses a dynamic GradScaler", ("float16", "bfloat16"))
    tf32: bool = opt(True, "TF32 matmuls and convolutions on Ampere and later")
    memory_format: str = opt("contiguous", "tensor memory format", ("contiguous", "channels_last"))
    compile: str | None = opt(
        None,
        "torch.compile the model for training and evaluation; --compile alone: default, reduce-overhead adds "
        "CUDA graphs, max-autotune also tunes kernels (--no-compile or unset: eager)",
        COMPILE_MODES,
        const="default",
    )


AUTO_AUGMENT = ("autoaugment", "randaugment", "trivialaugment")


@dataclass
class AugmentConfig:
    """Training augmentation beyond the crop and flip, per data set (the pytorch backend has all of it; the DALI
    backends the flips)."""

    hflip: bool = opt(True, "random horizontal flips (--no-hflip for text and other orientation-dependent images)")
    vflip: bool = opt(False, "random vertical flips too (aerial, microscopy, ... images without an up)")
    auto_augment: str | None = opt(None, "a learned or random augmentation policy (torchvision's)", AUTO_AUGMENT)
    rotation: float = opt(0.0, "random rotation by up to +-DEG degrees", metavar="DEG")
    color_jitter: float = opt(0.0, "brightness, contrast and saturation jitter of strength S (0.4 is common)",
                              metavar="S")  # fmt: skip
    random_erasing: float = opt(0.0, "probability of erasing a random rectangle to the mean colour", metavar="P")


@dataclass
class TrackingConfig:
    """Where a run's records go besides log.json (common/tracking/): TensorBoard event files and an MLflow server.
    Only rank 0 writes; a run resumed with --resume auto continues the same MLflow run and TensorBoard steps."""

    tensorboard: str | None = opt(
        None,
        "also write TensorBoard event files to DIR; --tensorboard alone (or 'auto'): <output>/tensorboard",
        const="auto",
        metavar="DIR",
    )
    mlflow: str | None = opt(
        None,
        "also log to the MLflow tracking server (or store) at URI; --mlflow alone (or 'auto'): $MLFLOW_TRACKING_URI",
        const="auto",
        metavar="URI",
    )
    experiment: str | None = opt(
        None, "MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else convnets)", metavar="NAME"
    )
    run_name: str | None = opt(None, "MLflow run name (default: the output folder's name)", metavar="NAME")
    mlflow_model: bool = opt(
        False,
        "also log best.pt as an MLflow PyTorch model with its class names, for the model registry (a checkpoint "
        "is large: off by default)",
    )
    mlflow_timeout: float = opt(
        60.0,
        "seconds the end of a run waits for an MLflow server to take what it has not yet taken; past them the rest "
        "is dropped, with one line saying how much",
        metavar="S",
    )
    target_top1: float | None = opt(
        None, "stop when validation top-1 first reaches X percent; the time and epoch to it are logged", metavar="X"
    )
    target_map: float | None = opt(
        None, "multi-label data: stop when validation mAP first reaches X percent (as --target-top1)", metavar="X"
    )


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015, common/distill.py): the student also learns the softened outputs
    of a teacher, one of this repository's checkpoints. T = 4 is the temperature of RepDistiller's KD baseline
    (Tian et al. 2020, ``--kd_T 4``), a common baseline of later distillation papers; alpha 0.5 weighs the labels
    and the teacher equally."""

    teacher: str | None = opt(
        None,
        "distil from this checkpoint of ours (any --arch, the same classes): it runs in eval mode, without "
        "gradients, on the student's batches",
        metavar="CHECKPOINT",
    )
    distill_alpha: float = opt(
        0.5, "with --teacher: loss = (1 - A) x the usual loss + A x T^2 x KL(teacher || student), both at T",
        metavar="A",
    )  # fmt: skip
    distill_temperature: float = opt(4.0, "with --teacher: the softmax temperature of both outputs", metavar="T")


@dataclass
class TrainConfig(DistillConfig, TrackingConfig, AugmentConfig, DataConfig, ModelConfig, PrecisionConfig,
                  DeviceConfig):  # fmt: skip
    freeze_backbone_epochs: int = opt(
        0,
        "two-stage fine-tuning: train only the head for N epochs (backbone BatchNorm frozen), then everything",
        metavar="N",
    )
    backbone_lr_mult: float = opt(1.0, "the backbone's learning rate as a multiple of the head's", metavar="M")
    balance: bool = opt(False, "weigh the loss by inverse class frequency (for imbalanced training sets)")
    positive_class: str | None = opt(
        None, "also report precision, recall, F1 and ROC AUC of this class against the others", metavar="NAME"
    )
    epochs: int = opt(90, "training epochs")
    batch_size: int = opt(256, "images per device per step")
    optimizer_batch_size: int | None = opt(
        None, "global batch per optimizer step; gradients accumulate to reach it (default: batch_size * world)"
    )
    optimizer: str = opt("sgd", "optimizer", ("sgd", "rmsprop", "adamw"))
    lr: float = opt(0.256, "learning rate per 256 images of optimizer batch (scaled linearly)")
    momentum: float = opt(0.875, "momentum (SGD, RMSprop)")
    nesterov: bool = opt(False, "Nesterov momentum (SGD)")
    weight_decay: float = opt(3.0517578125e-05, "weight decay")
    bn_weight_decay: bool = opt(False, "apply weight decay to BatchNorm weights and biases too")
    depthwise_weight_decay: bool = opt(True, "apply weight decay to depthwise convolution weights")
    label_smoothing: float = opt(0.1, "label smoothing")
    mixup: float = opt(0.0, "mixup alpha (0: off)")
    lr_schedule: str = opt("cosine", "learning-rate schedule after warmup", ("cosine", "step", "linear"))
    warmup_epochs: float = opt(
        8.0, "linear warmup epochs; a run given fewer --epochs than its preset gets the warmup scaled to it"
    )
    lr_steps: list[float] = opt(
        [30, 60, 80],
        "epochs at which the step schedule multiplies the lr by lr_gamma; a run given fewer --epochs than its "
        "preset gets them scaled to it",
    )
    lr_step_every: float | None = opt(
        None, "step schedule: multiply the lr by lr_gamma every N epochs instead of at --lr-steps (scaled as those)"
    )
    lr_gamma: float = opt(0.1, "step schedule factor")
    clip_grad_norm: float | None = opt(None, "clip the gradient norm to this value")
    ema_decay: float | None = opt(None, "keep an EMA of the weights with this decay and evaluate it too")
    sync_bn: bool = opt(False, "synchronise BatchNorm statistics across GPUs")
    seed: int = opt(0, "random seed (data order, augmentation, initialisation)")
    deterministic: bool = opt(False, "deterministic algorithms: a resumed run ends as an uninterrupted one")
    output: str | None = opt(None, "run folder for log.json, config.json and checkpoints (default: runs/<arch>)")
    resume: str | None = opt(None, "checkpoint to continue from, or 'auto' for the newest good one in --output")
    keep_last: int = opt(3, "epoch checkpoints to keep besides best.pt")
    print_freq: int = opt(50, "log a training line every N steps")
    eval_every: int = opt(1, "validate every N epochs (and always after the last)")
    max_steps_per_epoch: int | None = opt(None, "cut each epoch after N steps (smoke tests, profiling)")
    gpu_affinity: bool = opt(False, "pin each rank's CPU threads to the cores nearest its GPU (pynvml)")


@dataclass
class BenchmarkConfig(DataConfig, ModelConfig, PrecisionConfig, DeviceConfig):
    data: str | None = opt(None, "ImageFolder root (needed for --mode data and formats; default for train/inference: "
                           "synthetic)")  # fmt: skip
    mode: str = opt("train", "what to time: training steps, inference, the data loader alone, or a trained "
                    "checkpoint in every export format (speed and top-1)",
                    ("train", "inference", "data", "formats"))  # fmt: skip
    checkpoint: str | None = opt(None, "--mode formats: the training checkpoint to run in every format")
    batch_sizes: str = opt("1,8,64", "--mode formats: batch sizes to time, comma-separated")
    formats: str | None = opt(None, "--mode formats: only these formats, comma-separated (default: every one; "
                              "`--formats list` names them)")  # fmt: skip
    calibration_images: int = opt(512, "--mode formats: training images (DATA/train) the INT8 formats calibrate on")
    batch_size: int = opt(256, "images per step")
    iterations: int = opt(100, "timed iterations")
    warmup: int = opt(10, "untimed iterations first (compilation, cuDNN autotuning, loader start-up)")
    num_classes: int | None = opt(1000, "classifier size")
    json: str | None = opt(None, "write the result as JSON to this file (also printed when absent)")
    seed: int = opt(0, "random seed")


@dataclass
class EvaluateConfig(DeviceConfig):
    checkpoint: str | None = opt(None, "a training checkpoint (best.pt, checkpoint_epoch_NNNN.pt)", required=True)
    data: str | None = opt(None, "an ImageFolder split, or a root holding val/", required=True)
    data_backend: str | None = same_as(DataConfig, "data_backend")
    batch_size: int = opt(64, "images per batch")
    workers: int = same_as(DataConfig, "workers")
    width_mult: float | None = opt(None, "must match the checkpoint's when given")
    image_check: str = same_as(DataConfig, "image_check")
    skip_bad_images: bool = same_as(DataConfig, "skip_bad_images")
    output: str | None = opt(
        None, "folder for metrics.json and confusion_matrix.png (default: eval_<split> beside the checkpoint)"
    )
    positive_class: str | None = opt(
        None,
        "also report precision, recall, F1 and ROC AUC of this class (default: the training run's)",
        metavar="NAME",
    )
    json: bool = opt(False, "print one JSON object with top1, top5, loss, per-class")


@dataclass
class PredictConfig(DeviceConfig):
    checkpoint: str | None = opt(None, "a training checkpoint", required=True)
    paths: list[str] = opt([], "image files, folders (searched recursively) or glob patterns", positional="+")
    topk: int = opt(5, "classes per image")
    batch_size: int = opt(32, "images per batch")
    csv: bool = opt(False, "CSV instead of JSON lines")


@dataclass
class LearningCurveConfig(TrainConfig):
    fractions: str = opt("0.1,0.25,0.5,1.0", "training-set fractions to train on, comma-separated")
    output: str | None = opt(None, "folder for each run, learning_curve.md/.json/.png (default: runs/learning-curve)")


@dataclass
class AugmentPreviewConfig(AugmentConfig):
    data: str | None = opt(None, "an ImageFolder root holding train/ (or a split folder itself)", required=True)
    out: str = opt("augment_preview.png", "PNG file to write")
    image_size: int = opt(128, "size of each augmented sample")
    min_crop_scale: float = same_as(DataConfig, "min_crop_scale")
    images: int = opt(8, "training images (rows)")
    samples: int = opt(8, "augmented versions of each (columns; the first is the image as the model sees it at eval)")
    seed: int = opt(0, "which images and which draws")


@dataclass
class OrganizeConfig(PredictConfig):
    """``predict`` with ``--organize OUT``: the collection sorted into folders instead of printed."""

    organize: str | None = opt(
        None,
        "sort the images into OUT/<predicted class>/ (hard links, or copies with --copy) and record every decision "
        "in OUT/decisions.csv; a rerun continues where an interrupted one stopped",
        metavar="OUT",
    )
    min_confidence: float = opt(0.0, "with --organize: images predicted below this probability go to uncertain/")
    copy: bool = opt(False, "with --organize: copy the files instead of hard-linking them")
    chunk_size: int = opt(256, "with --organize: decisions appended to the CSV (and fsynced) per this many images")
    workers: int = opt(default_workers(4), "with --organize: decoding worker processes (0: none)")


@dataclass
class EmbedConfig(DeviceConfig):
    checkpoint: str | None = opt(
        None, "a training checkpoint; its penultimate layer gives the embeddings", required=True
    )
    paths: list[str] = opt([], "image files, folders (searched recursively) or glob patterns", positional="+")
    out: str | None = opt(None, "index folder to write (index.faiss, paths.txt, embeddings.npy, meta.json)",
                          required=True)  # fmt: skip
    batch_size: int = opt(64, "images per batch")
    workers: int = opt(default_workers(4), "decoding worker processes (0: none)")
    index_type: str = opt("auto", "faiss index: exact (flat), HNSW graph (hnsw), or flat up to 50,000 images (auto)",
                          ("auto", "flat", "hnsw"))  # fmt: skip
    overwrite: bool = opt(False, "replace the index already in --out")


@dataclass
class SimilarConfig(DeviceConfig):
    index: str | None = opt(None, "an index folder written by convnets embed", required=True)
    images: list[str] = opt([], "query image files", positional="+")
    k: int = opt(10, "neighbours per query", flag="-k")
    checkpoint: str | None = opt(None, "the model to embed the query with (default: the one the index was built with)")


@dataclass
class InfoConfig:
    arch: str = same_as(ModelConfig, "arch")
    image_size: int | None = opt(None, "input resolution (default: the model's; 224 with --list)")
    num_classes: int = opt(1000, "classifier size")
    width_mult: float | None = same_as(ModelConfig, "width_mult")
    list_models: bool = opt(False, "every registered model with its counts", flag="--list")
    json: bool = opt(False, "print JSON")


@dataclass
class PrepareConfig:
    dataset: str | None = opt(None, "data set to build an ImageFolder tree from", ("fashion-mnist",), positional="?")
    out: str | None = opt(None, "where to write the ImageFolder tree")
    source: str | None = opt(None, "folder holding the IDX files (default: Debian's dataset-fashion-mnist)")
    check: str | None = opt(None, "list every image below DIR that cannot be decoded (exit 1 if any)", metavar="DIR")
    workers: int = same_as(DataConfig, "workers")


@dataclass
class PrepareOwnConfig(PrepareConfig):
    """``prepare`` with the two own-data modes: ``folder`` (``--src RAW/<class>/*``) and ``csv`` (``path,label``)."""

    dataset: str | None = opt(
        None,
        "what to build: fashion-mnist, a raw folder with one sub-folder per class (folder, with --src), or a CSV of "
        "path,label rows (csv, with --csv and --root)",
        ("fashion-mnist", "folder", "csv"),
        positional="?",
    )
    src: str | None = opt(None, "prepare folder: the raw folder, one sub-folder per class")
    csv: str | None = opt(None, "prepare csv: a CSV of path,label rows (a header row is optional)")
    multi_label: bool = opt(
        False,
        "prepare csv: several labels per image (a cell of labels joined by ';', or one row per label); "
        "writes DATA/<split>/images/ and DATA/<split>/labels.csv for a sigmoid head",
    )
    root: str | None = opt(None, "prepare csv: the folder the CSV's relative paths start from (default: the CSV's)")
    val_fraction: float = opt(0.2, "share of each class's images for val/")
    test_fraction: float = opt(0.0, "share of each class's images for test/ (0: no test split)")
    seed: int = opt(0, "seed of the split")
    group_by: str | None = opt(
        None,
        "regular expression over each file's path below its class folder; files with the same match (its first "
        "group if it has one) stay on one side of the split, e.g. '^(.+)_frame\\d+' for frames of one video",
        metavar="REGEX",
    )
    dup_radius: int = opt(16, "near duplicates: at most this many of the 256 phash bits differ (0: exact copies only)")
    min_per_class: int = opt(20, "warn about classes with fewer images than this")
    overwrite: bool = opt(False, "replace a non-empty --out (after the new tree is complete)")


def _base_type(tp):
    """(scalar type, is_list) of an annotation such as ``int | None`` or ``list[int]``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _fields(cls) -> dict[str, tuple[dataclasses.Field, object]]:
    """Each field of ``cls`` with its resolved annotation (``from __future__ import annotations`` leaves strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one option per dataclass field. Defaults are suppressed so that only what the user typed
    reaches :func:`resolve`, which is what lets a preset sit between the defaults and the command line."""
    for name, (f, hint) in _fields(cls).items():
        tp, is_list = _base_type(hint)
        meta = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        helptext = meta.get("help", "")
        if "(default:" not in helptext and not meta.get("required") and not meta.get("positional"):
            helptext += f" (default: {default})"
        if meta.get("positional"):
            # An optional positional gets its own default: argparse would check SUPPRESS against the choices.
            absent = default if meta["positional"] == "?" else argparse.SUPPRESS
            parser.add_argument(name, type=tp, nargs=meta["positional"], choices=meta.get("choices"), default=absent,
                                help=helptext)  # fmt: skip
            continue
        flag = meta.get("flag", "--" + name.replace("_", "-"))
        dest = {"dest": name}
        if tp is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=helptext, **dest
            )
        elif "const" in meta:
            # An option with an optional value (``--compile`` means ``--compile default``) and a --no- form.
            parser.add_argument(flag, nargs="?", const=meta["const"], choices=meta.get("choices"), type=tp,
                                default=argparse.SUPPRESS, help=helptext, metavar=meta.get("metavar"),
                                **dest)  # fmt: skip
            parser.add_argument("--no-" + flag[2:], dest=name, action="store_const", const=None,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip
        else:
            parser.add_argument(
                flag,
                type=tp,
                nargs="+" if is_list else None,
                choices=meta.get("choices"),
                default=argparse.SUPPRESS,
                required=bool(meta.get("required")),
                help=helptext,
                metavar=meta.get("metavar", name.upper()) if meta.get("choices") is None else None,
                **dest,
            )


def _check_value(cls, key: str, value, source: str):
    fields = _fields(cls)
    if key not in fields:
        raise UserError(f"{source}: unknown setting {key!r}")
    f, hint = fields[key]
    tp, is_list = _base_type(hint)
    values = value if is_list and isinstance(value, list) else [value]
    if is_list and not isinstance(value, list):
        raise UserError(f"{source}: {key} must be a list, got {value!r}")
    if "const" in f.metadata and isinstance(value, bool):
        # ``compile = true`` in a preset reads as the option given alone, ``false`` as its --no- form.
        values = [f.metadata["const"] if value else None]
    out = []
    for v in values:
        if v is None and not is_list:
            out.append(None)
            continue
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            raise UserError(f"{source}: {key} must be {tp.__name__}, got {v!r}")
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            raise UserError(f"{source}: {key}={v!r} is not one of {', '.join(choices)}")
        out.append(v)
    return out if is_list else out[0]


def load_preset(path: str, profile: str | None) -> dict:
    """Read a recipe preset: top-level keys, then the keys of ``[profiles.<profile>]`` over them."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"preset file {path} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"preset file {path} is not valid TOML: {e}") from None
    profiles = data.pop("profiles", {})
    if profile is not None:
        if profile not in profiles:
            raise UserError(f"preset {path} has no profile {profile!r} (it has: {', '.join(profiles) or 'none'})")
        data.update(profiles[profile])
    return data


# Lower bounds checked after merging, so that a preset value is held to the same rules as a typed one.
MINIMUMS = {
    "epochs": 1, "batch_size": 1, "optimizer_batch_size": 1, "workers": 0, "image_size": 16, "val_resize": 16,
    "keep_last": 1, "print_freq": 1, "eval_every": 1, "max_steps_per_epoch": 1, "iterations": 1, "warmup": 0,
    "num_classes": 1, "lr": 0.0, "weight_decay": 0.0, "label_smoothing": 0.0, "mixup": 0.0, "warmup_epochs": 0.0,
    "topk": 1, "freeze_backbone_epochs": 0, "backbone_lr_mult": 0.0, "rotation": 0.0, "color_jitter": 0.0,
    "random_erasing": 0.0, "images": 1, "samples": 1, "mlflow_timeout": 0.0, "target_top1": 0.0, "target_map": 0.0,
}  # fmt: skip


def validate(cfg) -> None:
    for key, low in MINIMUMS.items():
        value = getattr(cfg, key, None)
        # Only numbers: a field of another command may share the name (similar's ``images`` are paths).
        if isinstance(value, int | float) and not isinstance(value, bool) and value < low:
            raise UserError(f"--{key.replace('_', '-')} must be at least {low}, got {value}")
    if not 0 < getattr(cfg, "min_crop_scale", 0.5) <= 1:
        raise UserError(f"--min-crop-scale must be in (0, 1], got {cfg.min_crop_scale}")
    if getattr(cfg, "random_erasing", 0.0) > 1:
        raise UserError(f"--random-erasing is a probability, got {cfg.random_erasing}")
    if getattr(cfg, "freeze_backbone_epochs", 0) and cfg.freeze_backbone:
        raise UserError("--freeze-backbone trains the head alone for the whole run; --freeze-backbone-epochs for "
                        "the first N epochs: pass one of them")  # fmt: skip
    if getattr(cfg, "ema_decay", None) is not None and not 0 < cfg.ema_decay < 1:
        raise UserError(f"--ema-decay must be between 0 and 1, got {cfg.ema_decay}")
    if getattr(cfg, "lr_step_every", None) is not None and cfg.lr_step_every <= 0:
        raise UserError(f"--lr-step-every must be positive, got {cfg.lr_step_every}")
    for name in ("target_top1", "target_map"):
        if getattr(cfg, name, None) is not None and not 0 < getattr(cfg, name) <= 100:
            raise UserError(f"--{name.replace('_', '-')} is a percentage in (0, 100], got {getattr(cfg, name)}")
    if not 0 <= getattr(cfg, "distill_alpha", 0.5) <= 1:
        raise UserError(f"--distill-alpha is the teacher's share of the loss, in [0, 1], got {cfg.distill_alpha}")
    if getattr(cfg, "distill_temperature", 1.0) <= 0:
        raise UserError(f"--distill-temperature must be positive, got {cfg.distill_temperature}")
    if getattr(cfg, "target_top1", None) is not None and getattr(cfg, "target_map", None) is not None:
        raise UserError("--target-top1 is for single-label data, --target-map for multi-label data: pass one")
    if not DEVICE_PATTERN.match(getattr(cfg, "device", "auto")):
        raise UserError(f"--device must be auto, cuda, cuda:N or cpu, got {cfg.device!r}")
    for name, (f, _) in _fields(type(cfg)).items():
        if f.metadata.get("required") and getattr(cfg, name) is None:
            raise UserError(f"--{name.replace('_', '-')} is required")


def fit_schedule(cfg, written_for: int, typed: set[str]):
    """The learning-rate schedule of ``cfg`` fitted to its run when it is shorter than the ``written_for`` epochs
    the preset (or the defaults) wrote the schedule for.

    Warmup and step milestones scale by epochs / written_for, so a recipe cut short keeps its shape (warmup, then
    the whole decay) instead of ending in its warmup; the warmup is also held to MAX_WARMUP_SHARE of any run.
    What the user typed on the command line (``typed``) is kept as given. Says what it changed in one line.
    """
    scale = min(1.0, cfg.epochs / written_for)
    changes = {}
    if "warmup_epochs" not in typed:
        warmup = min(cfg.warmup_epochs * scale, MAX_WARMUP_SHARE * cfg.epochs)
        if warmup < cfg.warmup_epochs:
            changes["warmup_epochs"] = round(warmup, 6)
    if scale < 1 and cfg.lr_schedule == "step":
        if cfg.lr_step_every is not None and "lr_step_every" not in typed:
            changes["lr_step_every"] = round(cfg.lr_step_every * scale, 6)
        elif cfg.lr_step_every is None and "lr_steps" not in typed:
            changes["lr_steps"] = [round(s * scale, 6) for s in cfg.lr_steps]
    freeze = getattr(cfg, "freeze_backbone_epochs", 0)
    if freeze and "freeze_backbone_epochs" not in typed and scale < 1:
        # The head's stage keeps its share of the run, and leaves at least one epoch to the whole network.
        changes["freeze_backbone_epochs"] = min(max(1, round(freeze * scale)), cfg.epochs - 1)
    if changes:
        said = ", ".join(f"{k} {getattr(cfg, k)} -> {v}" for k, v in changes.items())
        log.info("schedule fitted to this %d-epoch run (written for %d epochs): %s", cfg.epochs, written_for, said)
    return dataclasses.replace(cfg, **changes)


def resolve(cls, cli: dict, preset: str | None = None, profile: str | None = None):
    """Build ``cls`` from its defaults, then the preset, then the command line (``cli`` holds only typed options)."""
    values, training_only = {}, []
    if preset:
        for key, value in load_preset(preset, profile).items():
            if key not in _fields(cls) and key in _fields(TrainConfig):
                training_only.append(key)  # a recipe preset read by another command (benchmark): not its setting
                continue
            values[key] = _check_value(cls, key, value, f"preset {preset}")
        if training_only:
            log.info("preset %s: training settings not used here: %s", preset, ", ".join(training_only))
    elif profile:
        raise UserError("--profile needs --preset")
    written_for = values.get("epochs", getattr(cls, "epochs", None))  # the schedule's length, before the command line
    values.update(cli)
    cfg = cls(**values)
    validate(cfg)
    if hasattr(cfg, "lr_schedule"):
        cfg = fit_schedule(cfg, written_for, set(cli))
    if getattr(cfg, "freeze_backbone_epochs", 0) >= getattr(cfg, "epochs", 1) > 0:
        raise UserError(f"--freeze-backbone-epochs {cfg.freeze_backbone_epochs} leaves none of the {cfg.epochs} "
                        "epochs to the whole network; use --freeze-backbone to train the head alone")  # fmt: skip
    return cfg
