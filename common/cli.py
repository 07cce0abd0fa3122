"""``convnets`` (also ``python -m common``): train, evaluate, predict, benchmark, info, prepare."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys

from common import config
from common.errors import UserError, access_hint

log = logging.getLogger("convnets")


def _cli_values(args: argparse.Namespace, cls) -> dict:
    """The options of ``cls`` the user typed (defaults were suppressed, see config.add_arguments)."""
    names = {f for f in cls.__dataclass_fields__}
    return {k: v for k, v in vars(args).items() if k in names}


def cmd_train(args) -> int:
    from common.engine import train

    train(_resolve(args, config.TrainConfig))
    return 0


def _resolve(args: argparse.Namespace, cls):
    """``cls`` from its defaults, the preset where the command takes one, then the command line."""
    return config.resolve(cls, _cli_values(args, cls), getattr(args, "preset", None), getattr(args, "profile", None))


def cmd_evaluate(args) -> int:
    from common.inference import run_evaluate

    cfg = _resolve(args, config.EvaluateConfig)
    result = run_evaluate(cfg)
    if cfg.json:
        print(json.dumps(result))
    return 0


def cmd_predict(args) -> int:
    from common.inference import run_predict

    cfg = _resolve(args, config.OrganizeConfig)
    if cfg.organize:
        from common.owndata.organize import run_organize

        return run_organize(cfg)
    return run_predict(cfg)


def cmd_embed(args) -> int:
    from common.owndata.embed import run_embed

    return run_embed(_resolve(args, config.EmbedConfig))


def cmd_similar(args) -> int:
    from common.owndata.embed import run_similar

    return run_similar(_resolve(args, config.SimilarConfig))


def cmd_benchmark(args) -> int:
    from common.benchmark import run_benchmark

    cfg = _resolve(args, config.BenchmarkConfig)
    if cfg.mode == "formats":
        from common.formats import run_formats

        run_formats(cfg)
        return 0
    result = run_benchmark(cfg)
    if cfg.json is None:
        print(json.dumps(result, indent=2))
    return 0


def cmd_info(args) -> int:
    from common.info import count_all, count_model
    from common.registry import get_model_spec

    cfg = _resolve(args, config.InfoConfig)
    if cfg.list_models:
        rows = count_all(cfg.image_size or 224)
        if cfg.json:
            print(json.dumps([r.as_dict() | {"recipe": get_model_spec(r.arch).recipe} for r in rows]))
            return 0
        print(f"{'model':<22} {'recipe':<10} {'params (M)':>11} {'GMACs @' + str(rows[0].image_size):>11}  description")
        for r in rows:
            spec = get_model_spec(r.arch)
            print(f"{r.arch:<22} {spec.recipe:<10} {r.params / 1e6:>11.2f} {r.macs / 1e9:>11.3f}  {spec.description}")
        return 0
    counts = count_model(cfg.arch, cfg.image_size, cfg.num_classes, cfg.width_mult)
    if cfg.json:
        print(json.dumps(counts.as_dict()))
    else:
        spec = get_model_spec(cfg.arch)
        print(f"{counts.arch} ({spec.recipe}): {spec.description}")
        print(f"  input       {counts.image_size}x{counts.image_size}, {counts.num_classes} classes"
              + (f", width multiplier {counts.width_mult}" if counts.width_mult else ""))  # fmt: skip
        print(f"  parameters  {counts.params:,} ({counts.params / 1e6:.2f} M)")
        print(f"  mult-adds   {counts.macs:,} ({counts.macs / 1e9:.3f} G)")
    return 0


def cmd_prepare(args) -> int:
    from pathlib import Path

    from common.prepare import check_tree, prepare_fashion_mnist

    cfg = _resolve(args, config.PrepareOwnConfig)
    if cfg.dataset in ("folder", "csv"):
        from common.owndata.dataset import prepare_own

        prepare_own(cfg)
        return 0
    if cfg.check:
        bad = check_tree(Path(cfg.check), cfg.workers)
        return 1 if bad else 0
    if cfg.dataset is None:
        raise UserError(
            "prepare needs what to prepare: fashion-mnist, folder --src RAW (your class folders), "
            "csv --csv FILE (path,label rows), or --check DIR"
        )
    if cfg.out is None:
        raise UserError("prepare fashion-mnist needs --out DIR")
    prepare_fashion_mnist(Path(cfg.out), Path(cfg.source) if cfg.source else None, cfg.workers)
    return 0


def cmd_augment_preview(args) -> int:
    from common.preview import write_augment_preview

    write_augment_preview(_resolve(args, config.AugmentPreviewConfig))
    return 0


def cmd_learning_curve(args) -> int:
    from common.learning_curve import run_learning_curve

    cfg = _resolve(args, config.LearningCurveConfig)
    if "output" not in _cli_values(args, config.LearningCurveConfig):
        # A preset's output names its own training run (the finetune profiles do): the curve's runs go elsewhere.
        cfg = dataclasses.replace(cfg, output=None)
    run_learning_curve(cfg)
    return 0


def cmd_export(args) -> int:
    from common.serving.config import ExportConfig
    from common.serving.export import export_model

    export_model(config.resolve(ExportConfig, _cli_values(args, ExportConfig)).check())
    return 0


def cmd_serve(args) -> int:
    from common.serving.app import serve
    from common.serving.config import ServeConfig

    serve(config.resolve(ServeConfig, _cli_values(args, ServeConfig)).check())
    return 0


def add_preset_options(parser: argparse.ArgumentParser, profile_example: str) -> None:
    """``--preset`` and ``--profile``, for the commands that read a recipe preset (see ``config.resolve``)."""
    parser.add_argument("--preset", help="recipe preset file (TOML), e.g. resnet50/preset.toml")
    parser.add_argument("--profile", help=f"named profile inside the preset, e.g. {profile_example}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_preset_options(p, "250e or quickstart")
    config.add_arguments(p, config.TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="top-1/top-5, per-class accuracy and a confusion matrix of a checkpoint")
    config.add_arguments(p, config.EvaluateConfig)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k classes of image files, folders or globs (or --organize them)")
    config.add_arguments(p, config.OrganizeConfig)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("embed", help="penultimate-layer embeddings of a collection in a faiss index")
    config.add_arguments(p, config.EmbedConfig)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("similar", help="the images of an embedding index nearest to a query image")
    config.add_arguments(p, config.SimilarConfig)
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("benchmark", help="throughput and latency of training, inference or the data pipeline")
    add_preset_options(p, "quickstart")
    config.add_arguments(p, config.BenchmarkConfig)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("info", help="parameters and multiply-adds of a model (or --list all of them)")
    config.add_arguments(p, config.InfoConfig)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "prepare", help="build an ImageFolder tree from a data set, a raw folder or a CSV; or check one for bad files"
    )
    config.add_arguments(p, config.PrepareOwnConfig)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("learning-curve", help="fine-tune on growing subsets: is it worth collecting more images?")
    add_preset_options(p, "finetune")
    config.add_arguments(p, config.LearningCurveConfig)
    p.set_defaults(func=cmd_learning_curve)

    p = sub.add_parser(
        "augment-preview", help="a PNG grid of augmented training samples, to check augmentation options"
    )
    config.add_arguments(p, config.AugmentPreviewConfig)
    p.set_defaults(func=cmd_augment_preview)

    from common.serving.config import ExportConfig, ServeConfig  # dataclasses only: no web or ONNX import here

    p = sub.add_parser(
        "export", help="a checkpoint to ONNX, TorchScript, torch.export or TensorRT (+ Triton repository)"
    )
    config.add_arguments(p, ExportConfig)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="a KServe v2 HTTP server with dynamic batching, metrics and a web page")
    config.add_arguments(p, ServeConfig)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from common.logger import setup_stdout_logging

    # torchrun sets RANK; only rank 0 talks (the others report warnings and errors). Where stdout carries
    # results (predict, --json), the log goes to stderr so that `> out.json` stays valid.
    data_on_stdout = args.func in (cmd_predict, cmd_similar) or getattr(args, "json", None) is True
    setup_stdout_logging(is_main=os.environ.get("RANK", "0") == "0", stream=sys.stderr if data_on_stdout else None)
    try:
        code = args.func(args)
    except BrokenPipeError:
        # The reader closed the pipe (`| head`): stop quietly; later writes to stdout would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or e.filename is None:
            raise
        # A folder of the host's user in a container (or the other way round), a read-only mount: one line naming
        # the file and what to do, not a traceback (the other ranks of a torchrun job print the same line).
        print(f"error: {e.strerror}: {e.filename} ({access_hint()})", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
