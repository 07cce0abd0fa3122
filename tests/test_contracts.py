"""Contracts of the engine's parts: data backends, sharding, configuration precedence, checkpoint safety."""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from common import config
from common.atomic import atomic_write_text
from common.checkpoint import CheckpointManager, atomic_save, load_checkpoint
from common.data import PipelineSpec, build_loader, eval_shard, scan_split, train_shard
from common.errors import UserError

CPU = torch.device("cpu")


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("channels_last", [False, True])
def test_backends_agree_on_labels_shapes_and_pixels(image_tree, channels_last):
    images = scan_split(image_tree / "val")
    spec = PipelineSpec(image_size=32, resize_size=36, batch_size=10, workers=2, channels_last=channels_last)
    dali = batches(build_loader("dali-cpu", images, spec, train=False, device=CPU))
    torch_ = batches(build_loader("pytorch", images, spec, train=False, device=CPU))
    assert len(dali) == len(torch_) == 7  # 64 images, the last batch partial
    for (xd, yd), (xt, yt) in zip(dali, torch_, strict=True):
        assert xd.shape == xt.shape and xd.shape[1:] == (3, 32, 32)
        assert xd.dtype == xt.dtype == torch.float32 and yd.dtype == yt.dtype == torch.int64
        assert torch.equal(yd, yt)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert xd.is_contiguous(memory_format=fmt) and xt.is_contiguous(memory_format=fmt)
        # Same decode, resize and crop up to the two libraries' resampling filters.
        assert (xd - xt).abs().mean() < 0.15
    labels = torch.cat([y for _, y in dali])
    assert labels.tolist() == images.labels  # eval order is the file order


def test_every_image_mode_becomes_rgb(image_tree):
    """The tree mixes grayscale, palette, RGBA and CMYK files; each backend yields 3 channels for all, with the
    class colour in them: a grey file gives three equal channels, a coloured one its hue."""
    from PIL import Image

    from common.data import IMAGENET_MEAN, IMAGENET_STD

    images = scan_split(image_tree / "val")
    modes = [Image.open(f).mode for f in images.files]
    assert set(modes) >= {"L", "P", "RGBA", "CMYK", "RGB"}
    spec = PipelineSpec(image_size=24, resize_size=28, batch_size=16, workers=1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    red = images.classes.index("red")
    for backend in ("dali-cpu", "pytorch"):
        x = torch.cat([x for x, _ in batches(build_loader(backend, images, spec, train=False, device=CPU))])
        assert x.shape == (len(images), 3, 24, 24), backend
        rgb = (x * std + mean) * 255  # back to pixel values, file order (eval keeps it)
        for i, (mode, label) in enumerate(zip(modes, images.labels, strict=True)):
            r, g, b = rgb[i].mean((1, 2)).tolist()
            if mode == "L":
                assert abs(r - g) < 2 and abs(g - b) < 2, (backend, images.files[i])
            elif label == red:
                assert r > b + 40 and r > g + 40, (backend, mode, images.files[i], (r, g, b))


def test_training_order_and_augmentation_depend_on_seed_and_epoch_only(image_tree):
    images = scan_split(image_tree / "train")
    spec = PipelineSpec(image_size=24, resize_size=28, batch_size=16, workers=2, seed=5)
    for backend in ("dali-cpu", "pytorch"):
        first = batches(build_loader(backend, images, spec, train=True, device=CPU), epoch=3)
        again = batches(build_loader(backend, images, spec, train=True, device=CPU), epoch=3)
        other = batches(build_loader(backend, images, spec, train=True, device=CPU), epoch=4)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
        assert not torch.equal(first[0][0], other[0][0])


def test_train_shards_split_each_global_batch():
    n, batch, world = 103, 4, 3
    single = train_shard(n, batch * world, 0, 1, seed=1, epoch=2)
    shards = [train_shard(n, batch, r, world, seed=1, epoch=2) for r in range(world)]
    assert all(len(s) == len(shards[0]) for s in shards)
    for step in range(len(single) // (batch * world)):
        global_batch = single[step * batch * world : (step + 1) * batch * world]
        parts = [s[step * batch : (step + 1) * batch] for s in shards]
        assert np.array_equal(np.concatenate(parts), global_batch)
    eval_parts = np.concatenate([eval_shard(n, r, world) for r in range(world)])
    assert sorted(eval_parts.tolist()) == list(range(n))


def test_the_pytorch_backend_pixels_do_not_depend_on_rank_or_workers(image_tree):
    """Per-image seeds: rank 1 of 2 sees exactly micro-batch 1 of one process's global batch."""
    images = scan_split(image_tree / "train")
    one = batches(build_loader("pytorch", images, PipelineSpec(24, 28, batch_size=16, workers=0), True, CPU, 0, 1))
    rank1 = batches(build_loader("pytorch", images, PipelineSpec(24, 28, batch_size=8, workers=2), True, CPU, 1, 2))
    assert torch.equal(one[0][0][8:], rank1[0][0]) and torch.equal(one[0][1][8:], rank1[0][1])


def _parse(argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.TrainConfig)
    return {k: v for k, v in vars(parser.parse_args(argv)).items()}


def test_precedence_defaults_preset_profile_command_line(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('arch = "resnet18"\nepochs = 7\nlr = 1\n[profiles.long]\nepochs = 70\nmixup = 0.2\n')
    cfg = config.resolve(config.TrainConfig, _parse(["--epochs", "3"]), str(preset), "long")
    assert (cfg.arch, cfg.epochs, cfg.mixup, cfg.lr, cfg.batch_size) == ("resnet18", 3, 0.2, 1.0, 256)
    cfg = config.resolve(config.TrainConfig, _parse(["--no-amp", "--lr-steps", "5", "9"]), str(preset))
    assert (cfg.epochs, cfg.amp, cfg.lr_steps) == (7, False, [5, 9])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs = 'ten'", "epochs must be int"),
        ("epoch = 10", "unknown setting 'epoch'"),
        ("optimizer = 'lamb'", "optimizer='lamb' is not one of"),
        ("batch_size = 0", "--batch-size must be at least 1"),
        ("epochs = [", "is not valid TOML"),
    ],
)
def test_bad_presets_are_named(tmp_path, text, message):
    preset = tmp_path / "bad.toml"
    preset.write_text(text + "\n")
    with pytest.raises(UserError, match=message) as err:
        config.resolve(config.TrainConfig, {}, str(preset))
    if "TOML" not in message and "at least" not in message:
        assert str(preset) in str(err.value)


def test_checkpoints_never_unpickle_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": argparse.Namespace(x=1)}, path)  # an arbitrary object
    with pytest.raises(UserError, match=f"checkpoint {path} cannot be read") as refused:
        load_checkpoint(path)
    # torch's own message goes on to advise weights_only=False, which would run the file's code: not passed on.
    assert "weights_only" not in str(refused.value) and "plain values" in str(refused.value)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(path)


def test_atomic_save_and_rotation(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for epoch in range(4):
        manager.save({"epoch": epoch, "w": torch.full((3,), float(epoch))}, epoch, is_best=epoch == 1)
    assert [p.name for p in manager.epoch_files()] == ["checkpoint_epoch_0002.pt", "checkpoint_epoch_0003.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    # A failing save leaves the previous file intact.
    with pytest.raises((pickle.PicklingError, AttributeError), match="Can.t pickle"):  # local objects: AttributeError
        atomic_save({"bad": lambda: 0}, tmp_path / "best.pt")
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp"))


KILLED_SAVE = """import os, signal, sys
from pathlib import Path
from common.atomic import atomic_write
def write(f):
    f.write(b"x" * 4096)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # docker kill in the middle of a checkpoint save
atomic_write(Path(sys.argv[1]), write)
"""


def test_resume_removes_what_a_killed_save_left_and_nothing_else(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"epoch": 0}, 0, is_best=True)
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "checkpoint_epoch_0001.pt")], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint_epoch_0001.pt.")]
    assert len(partial) == 1 and partial[0].stat().st_size == 4096
    (tmp_path / ".keep").write_text("")
    (tmp_path / "notes.tmp").write_text("")
    state, path = manager.load_latest()
    assert (state["epoch"], path.name) == (0, "checkpoint_epoch_0000.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "best.pt", "checkpoint_epoch_0000.pt", "notes.tmp"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_permissions_open_gives(tmp_path, umask):
    # mkstemp's 0o600 made every checkpoint, export and result file unreadable to any other user: a host export
    # mounted into the image's uid 10001 failed with PermissionError on convnets.json.
    previous = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        atomic_write_text(tmp_path / "atomic.txt", "x")
        atomic_save({"a": 1}, tmp_path / "best.pt")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("atomic.txt", "best.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_batch_metrics_stay_on_the_logits_device():
    """Evaluation sums its metrics on the device of the model's output: a tensor made on the CPU beside CUDA
    ones cannot be stacked. The meta device stands in for CUDA on a machine without one."""
    from common.evaluation import batch_metrics

    logits, labels = torch.randn(6, 10, device="meta"), torch.zeros(6, dtype=torch.long, device="meta")
    sums, top1 = batch_metrics(logits, labels, k=5)
    assert sums.device.type == "meta" and top1.device.type == "meta" and sums.shape == (4,)

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    sums, top1 = batch_metrics(logits, torch.tensor([1, 2, 2]), k=2)
    assert sums[1:].tolist() == [2.0, 2.0, 3.0] and top1.tolist() == [1, 0, 2]


def test_an_epoch_run_to_its_end_keeps_the_dali_pipeline(image_tree):
    """train_one_epoch lets the loader finish (DALI's StopIteration) unless the epoch is cut, so the pipeline
    built in epoch 0 serves every later epoch; each new pipeline costs start-up time and host memory."""
    from common.engine import train_one_epoch
    from common.logger import RunLogger
    from common.step import Optimization, Precision, StepRunner

    images = scan_split(image_tree / "train")
    spec = PipelineSpec(image_size=32, resize_size=36, batch_size=32, workers=1)
    loader = build_loader("dali-cpu", images, spec, train=True, device=CPU)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, len(images.classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    opt = Optimization(optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
    step = StepRunner(model, torch.nn.CrossEntropyLoss(), opt, Precision(amp=False))
    logger = RunLogger(None, enabled=False)
    pipelines = []
    for epoch in range(3):
        train_one_epoch(step, loader, epoch, logger, print_freq=100, max_steps=None, world=1)
        pipelines.append(loader.iterator)
    assert pipelines[0] is not None and all(p is pipelines[0] for p in pipelines)
    assert step.micro_step == 3 * len(loader)

    train_one_epoch(step, loader, 3, logger, print_freq=100, max_steps=2, world=1)
    assert step.micro_step == 3 * len(loader) + 2 and loader.iterator is None  # a cut epoch drops its queue


def test_each_rank_resumes_its_own_random_streams():
    from common.checkpoint import restore_rng, rng_state

    saved = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        np.random.seed(100 + rank)
        saved.append(rng_state())
    expected = []
    for rank in range(2):
        restore_rng(saved, rank, world=2, fallback_seed=0)
        expected.append((torch.rand(3), np.random.rand()))
    assert not torch.equal(expected[0][0], expected[1][0]) and expected[0][1] != expected[1][1]
    for rank in (1, 0):
        restore_rng(saved, rank, world=2, fallback_seed=0)
        assert torch.equal(torch.rand(3), expected[rank][0]) and np.random.rand() == expected[rank][1]

    # Another world size cannot continue the streams: ranks are reseeded, still differently.
    draws = []
    for rank in range(4):
        restore_rng(saved, rank, world=4, fallback_seed=7)
        draws.append(torch.rand(3))
    assert all(not torch.equal(draws[a], draws[b]) for a in range(4) for b in range(a))


def test_amp_follows_the_device_unless_given():
    from common.step import resolve_amp

    cuda = torch.device("cuda", 0)  # a device object needs no GPU
    assert (resolve_amp(None, cuda), resolve_amp(None, CPU)) == (True, False)
    assert (resolve_amp(False, cuda), resolve_amp(True, CPU)) == (False, True)
