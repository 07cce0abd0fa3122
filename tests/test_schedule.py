"""Learning-rate schedules: "every N epochs" equals the epoch lists it replaced, and a run shorter than its
preset gets the preset's schedule fitted to it (warmup and decay both inside the run)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.builders import lr_factor
from common.config import TrainConfig, resolve

ROOT = Path(__file__).resolve().parents[1]


def factors(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The LR factor at every optimizer step of the run ``cfg`` describes."""
    return [
        lr_factor(
            step,
            steps_per_epoch,
            cfg.epochs,
            cfg.warmup_epochs,
            cfg.lr_schedule,
            cfg.lr_steps,
            cfg.lr_gamma,
            cfg.lr_step_every,
        )  # fmt: skip
        for step in range(cfg.epochs * steps_per_epoch)
    ]


@pytest.mark.parametrize(
    "profile, old_steps",
    [(None, list(range(1, 300))), ("mobilenet_v3_large", list(range(2, 600, 2)))],
)
def test_every_n_epochs_equals_the_epoch_lists_it_replaced(profile, old_steps):
    """mobilenet/preset.toml listed every epoch boundary (1..299, and 2, 4, ..., 598 for v3); at full length
    ``lr_step_every`` must give the same LR at every step."""
    cfg = resolve(TrainConfig, {}, str(ROOT / "mobilenet" / "preset.toml"), profile)
    assert cfg.lr_step_every is not None and cfg.warmup_epochs == 0
    old = TrainConfig(**{**cfg.__dict__, "lr_steps": old_steps, "lr_step_every": None})
    assert factors(cfg, 3) == factors(old, 3)


def test_a_run_shorter_than_the_presets_warmup_still_anneals(caplog):
    """ResNet-50's preset warms up for 8 of 90 epochs; given --epochs 6 the run must warm up, reach the peak and
    anneal to (near) zero, and say so in one line."""
    with caplog.at_level(logging.INFO, logger="convnets"):
        cfg = resolve(TrainConfig, {"epochs": 6}, str(ROOT / "resnet50" / "preset.toml"))
    assert cfg.warmup_epochs == pytest.approx(8 * 6 / 90, abs=1e-6)
    (line,) = [r.getMessage() for r in caplog.records if "schedule fitted" in r.getMessage()]
    assert "6-epoch run (written for 90 epochs)" in line and "warmup_epochs 8.0 -> 0.533333" in line
    f = factors(cfg, 50)
    assert max(f) == pytest.approx(1.0, abs=0.01)
    assert f[-1] < 0.001


def test_a_cut_step_schedule_keeps_its_whole_decay():
    """MobileNet's x0.98 per epoch over 300 epochs cut to 8 decays as far as the full run (0.98^299), and VGG's
    steps at 30 and 60 of 90 epochs fall at 3 and 6 of 9."""
    cfg = resolve(TrainConfig, {"epochs": 8}, str(ROOT / "mobilenet" / "preset.toml"))
    assert cfg.lr_step_every == pytest.approx(8 / 300, abs=1e-6)
    assert factors(cfg, 100)[-1] == pytest.approx(0.98**299, rel=1e-6)
    vgg = resolve(TrainConfig, {"epochs": 9}, str(ROOT / "vgg" / "preset.toml"))
    assert vgg.lr_steps == [3, 6]
    assert factors(vgg, 10)[29:31] == pytest.approx([1.0, 0.1]) and factors(vgg, 10)[-1] == pytest.approx(0.01)


def test_full_length_and_typed_schedules_are_kept_as_written():
    """Fitting never touches a run at its preset's length (nor a longer one), nor what the user typed."""
    preset = str(ROOT / "resnet50" / "preset.toml")
    assert resolve(TrainConfig, {}, preset).warmup_epochs == 8
    assert resolve(TrainConfig, {"epochs": 120}, preset).warmup_epochs == 8
    assert resolve(TrainConfig, {}, preset, "fashion-mnist").warmup_epochs == 0.5
    assert resolve(TrainConfig, {}, preset, "quickstart").warmup_epochs == 0.2
    assert resolve(TrainConfig, {"epochs": 6, "warmup_epochs": 2.0}, preset).warmup_epochs == 2.0
    typed = resolve(TrainConfig, {"epochs": 9, "lr_steps": [5.0]}, str(ROOT / "vgg" / "preset.toml"))
    assert typed.lr_steps == [5.0]


def test_warmup_is_held_to_a_fifth_of_any_run(tmp_path):
    """A preset whose warmup fills its own run (here 4 of 5 epochs) still leaves most of the run to anneal."""
    preset = tmp_path / "p.toml"
    preset.write_text("epochs = 5\nwarmup_epochs = 4\n")
    assert resolve(TrainConfig, {}, str(preset)).warmup_epochs == pytest.approx(1.0)


def test_a_resume_with_other_optimizer_settings_says_which_it_keeps(tmp_path, caplog):
    """--resume auto restores the optimizer and schedule as saved: a command that changed the batch size or the
    learning rate in between is told so, by name, instead of training silently on the old values."""
    from common.engine import train
    from tests.conftest import make_tree

    data = make_tree(tmp_path / "data", train_per_class=4, val_per_class=2, mixed_modes=False)
    cli = {"data": str(data), "output": str(tmp_path / "run"), "arch": "resnet18", "image_size": 32,
           "batch_size": 8, "workers": 0, "data_backend": "pytorch", "epochs": 1, "lr": 0.1,
           "warmup_epochs": 0.0, "image_check": "none", "resume": "auto"}  # fmt: skip
    train(resolve(TrainConfig, cli))
    with caplog.at_level(logging.WARNING, logger="convnets"):
        train(resolve(TrainConfig, cli | {"epochs": 2}))
    assert "other settings" not in caplog.text  # more epochs: how a run trains further
    with caplog.at_level(logging.WARNING, logger="convnets"):
        train(resolve(TrainConfig, cli | {"epochs": 3, "batch_size": 4, "lr": 0.4}))
    assert "batch_size 8 -> 4" in caplog.text and "lr 0.1 -> 0.4" in caplog.text
