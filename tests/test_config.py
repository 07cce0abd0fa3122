"""One configuration system for every command: evaluate, predict, info and prepare parse into typed dataclasses
through config.add_arguments and config.resolve, as train and benchmark do."""

from __future__ import annotations

import dataclasses
import types

import pytest

from common import cli, config
from common.errors import UserError


def captured(monkeypatch, module: str, function: str, argv: list[str], returns=None):
    """Run ``convnets ARGV`` with ``module.function`` replaced; return the arguments the command handed it."""
    import importlib

    seen = []
    monkeypatch.setattr(importlib.import_module(module), function, lambda *a, **k: seen.append((a, k)) or returns)
    args = cli.build_parser().parse_args(argv)
    args.func(args)
    return seen[0][0]


def test_evaluate_gets_its_dataclass_with_shared_option_defaults(monkeypatch):
    argv = ["evaluate", "--checkpoint", "c.pt", "--data", "d", "--batch-size", "8", "--device", "cpu"]
    (cfg,) = captured(monkeypatch, "common.inference", "run_evaluate", argv, {})
    assert isinstance(cfg, config.EvaluateConfig)
    assert (cfg.checkpoint, cfg.data, cfg.batch_size, cfg.device, cfg.json) == ("c.pt", "d", 8, "cpu", False)
    # Options shared with training come from one definition: a changed default reaches both commands.
    assert cfg.image_check == config.DataConfig().image_check and cfg.workers == config.DataConfig().workers


def test_predict_takes_paths_positionally_and_accepts_one_gpu(monkeypatch):
    argv = ["predict", "--checkpoint", "c.pt", "a.jpg", "dir/", "--topk", "3", "--device", "cuda:1"]
    (cfg,) = captured(monkeypatch, "common.inference", "run_predict", argv)
    assert isinstance(cfg, config.PredictConfig)
    assert (cfg.paths, cfg.topk, cfg.device, cfg.csv) == (["a.jpg", "dir/"], 3, "cuda:1", False)


def test_info_and_prepare_resolve_their_dataclasses(monkeypatch):
    counts = types.SimpleNamespace(as_dict=dict)
    argv = ["info", "--arch", "mobilenet_v1", "--width-mult", "0.5", "--json"]
    arch, size, classes, width = captured(monkeypatch, "common.info", "count_model", argv, counts)
    assert (arch, size, classes, width) == ("mobilenet_v1", None, 1000, 0.5)
    root, workers = captured(
        monkeypatch, "common.prepare", "check_tree", ["prepare", "--check", "x", "--workers", "1"], []
    )
    assert (str(root), workers) == ("x", 1)
    args = cli.build_parser().parse_args(["info", "--list"])
    assert config.resolve(config.InfoConfig, cli._cli_values(args, config.InfoConfig)).list_models is True


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (config.EvaluateConfig, {"data": "d"}, "--checkpoint is required"),
        (config.PredictConfig, {"checkpoint": "c", "paths": ["a"], "topk": 0}, "--topk must be at least 1"),
        (config.PredictConfig, {"checkpoint": "c", "paths": ["a"], "device": "gpu"}, "--device must be auto, cuda"),
        (config.TrainConfig, {"device": "cuda:x"}, "--device must be auto, cuda"),
    ],
)
def test_resolve_names_the_bad_field(cls, values, message):
    with pytest.raises(UserError, match=message):
        config.resolve(cls, values)


def test_every_command_config_has_help_for_every_field():
    """add_arguments builds each command's options from its dataclass: a field without help would be a bare flag."""
    for cls in (config.TrainConfig, config.BenchmarkConfig, config.EvaluateConfig, config.PredictConfig,
                config.InfoConfig, config.PrepareConfig):  # fmt: skip
        missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
        assert not missing, (cls.__name__, missing)


def test_a_shared_option_can_take_its_own_help():
    """``same_as`` repeats another command's option; a command may word its help differently."""
    f = config.same_as(config.DataConfig, "workers", help="decode threads for this command")
    assert f.metadata["help"] == "decode threads for this command"
    assert f.default == config.DataConfig().workers


def test_data_workers_follow_the_cores_per_rank(monkeypatch):
    """DALI threads / loader processes default to this node's usable cores divided among its torchrun ranks."""
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert config.default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert config.default_workers() == 16  # capped
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert config.default_workers() == 1


def test_bounds_apply_to_numbers_only():
    """``images`` is a count for augment-preview (at least 1) and a list of query files for similar."""
    with pytest.raises(UserError, match="--images must be at least 1"):
        config.resolve(config.AugmentPreviewConfig, {"data": "d", "images": 0})
    cfg = config.resolve(config.SimilarConfig, {"index": "i", "images": ["a.jpg", "b.jpg"]})
    assert cfg.images == ["a.jpg", "b.jpg"]


def test_benchmark_takes_what_applies_to_it_from_a_recipe_preset(tmp_path):
    """A recipe preset is written for training: benchmark reads the model, sizes and precision from it and leaves
    the schedule; a key no command knows is still an error."""
    from tests.conftest import ROOT

    cfg = config.resolve(config.BenchmarkConfig, {"mode": "inference"}, str(ROOT / "resnet50" / "preset.toml"))
    assert (cfg.arch, cfg.image_size, cfg.memory_format, cfg.batch_size) == ("resnet50", 224, "channels_last", 256)
    preset = tmp_path / "p.toml"
    preset.write_text("arch = 'resnet18'\nepoch = 3\n")
    with pytest.raises(UserError, match="unknown setting 'epoch'"):
        config.resolve(config.BenchmarkConfig, {}, str(preset))
