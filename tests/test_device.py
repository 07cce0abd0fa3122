"""--device auto|cuda|cpu, and the CUDA RNG state of a resume on another GPU count, on a machine without a GPU:
the probes (driver version, torch.cuda) are replaced by monkeypatching."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from common import checkpoint
from common import distributed as dist
from common.cli import build_parser
from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def old_driver(monkeypatch):
    """A machine with an NVIDIA driver 535 and a torch built for CUDA 13.0: CUDA is not usable."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "nvidia_driver_version", lambda: "535.104.05")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_auto_warns_once_why_cuda_is_unusable_and_runs_on_the_cpu(old_driver, caplog):
    with caplog.at_level(logging.WARNING):
        assert dist.resolve_device("auto") == torch.device("cpu")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for part in ("535.104.05", "CUDA 13.0", "driver 580 or newer", "whl/cu126"):
        assert part in warning


def test_cuda_stops_with_the_reason_and_cpu_forces_the_cpu(old_driver, caplog):
    with pytest.raises(UserError, match=r"--device cuda: CUDA is not usable: NVIDIA driver 535.104.05 is too old"):
        dist.resolve_device("cuda")
    with caplog.at_level(logging.WARNING):
        assert dist.resolve_device("cpu") == torch.device("cpu")
    assert not caplog.records


def test_a_driver_too_old_for_any_current_wheel_says_so(old_driver, monkeypatch):
    monkeypatch.setattr(dist, "nvidia_driver_version", lambda: "418.87")
    with pytest.raises(UserError, match="418.87 is too old.*no current torch wheel supports it"):
        dist.resolve_device("cuda")


def test_without_nvidia_devices_auto_is_quiet_and_cuda_refuses(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "nvidia_driver_version", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert dist.resolve_device("auto") == torch.device("cpu")
    assert not caplog.records
    with pytest.raises(UserError, match="no NVIDIA GPU"):
        dist.resolve_device("cuda")


def test_a_usable_cuda_gives_each_local_rank_its_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert dist.resolve_device("auto", local_rank=3) == torch.device("cuda", 1)
    assert dist.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    assert current == [torch.device("cuda", 1), torch.device("cuda", 0)]  # events and streams follow the device
    assert dist.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="cuda:2: this machine shows 2 GPU"):
        dist.resolve_device("cuda:2")


def test_cpu_ranks_share_the_cores_this_process_may_use(monkeypatch):
    """Threads per CPU rank come from this process's CPU set (a container's, Slurm's), not the machine's count:
    one rank per node on a 64-core machine that gives it one core computes with one thread."""
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: {5}, raising=False)
    monkeypatch.setattr(dist.os, "cpu_count", lambda: 64)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: True)  # as if torchrun's process group were joined
    monkeypatch.setattr(dist.dist, "get_rank", lambda: 1)
    threads = torch.get_num_threads()
    try:
        runtime = dist.init_distributed("cpu")
        assert (runtime.rank, runtime.world_size, torch.get_num_threads()) == (1, 2, 1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "text, version",
    [
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n", "535.104.05"),
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder)\n",
         "580.65.06"),
    ],
)  # fmt: skip
def test_the_driver_version_is_read_from_proc(tmp_path, text, version):
    proc = tmp_path / "version"
    proc.write_text(text)
    assert dist.nvidia_driver_version(str(proc)) == version


def _fake_python(tmp_path: Path) -> dict:
    """An environment whose $PYTHON prints the arguments the launcher gives it, one per line."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return {**os.environ, "PYTHON": str(fake)}


@pytest.mark.parametrize("launcher", ["resnet50/train_1gpu.sh", "mobilenet/train_1gpu.sh", "vgg/train_1gpu.sh"])
def test_launchers_ask_for_a_device_and_the_users_choice_wins(launcher, tmp_path):
    """Without an NVIDIA driver here the launcher asks for auto; a --device the user adds comes later and wins."""
    run = subprocess.run(["bash", str(ROOT / launcher), "--device", "cpu"], env=_fake_python(tmp_path),
                         capture_output=True, text=True, check=True)  # fmt: skip
    argv = run.stdout.split("\n")
    expected = "cuda" if Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists() else "auto"
    first = argv.index("--device")
    assert argv[first + 1] == expected and argv[-3:-1] == ["--device", "cpu"]
    args = build_parser().parse_args(argv[2:-1])  # after "-m common"
    assert args.device == "cpu"


def test_rng_state_holds_only_this_ranks_gpu(monkeypatch):
    """Each rank saves its own GPU's generator, not every visible one: a machine with fewer GPUs can restore it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.full((4,), device, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", pytest.fail)
    state = checkpoint.rng_state()
    assert torch.equal(state["cuda"], torch.full((4,), 1, dtype=torch.uint8))


@pytest.mark.parametrize("saved_gpus", [4, 2])
def test_restore_sets_only_this_ranks_gpu_from_new_and_old_checkpoints(monkeypatch, saved_gpus):
    """New checkpoints hold one state per rank; old ones a list over every GPU the rank saw (4 on the machine that
    saved), of which this rank takes its own device's entry, on a machine that has 2."""
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: set_calls.append((int(s[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", pytest.fail)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.full((4,), 7, dtype=torch.uint8))
    new = checkpoint.rng_state()
    checkpoint.set_rng_state(new)
    old = dict(new, cuda=[torch.full((4,), i, dtype=torch.uint8) for i in range(saved_gpus)])
    checkpoint.set_rng_state(old)
    assert set_calls == [(7, 1), (1, 1)]


def test_an_old_checkpoint_without_this_gpus_state_keeps_the_seeded_one(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.zeros(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", pytest.fail)
    old = dict(checkpoint.rng_state(), cuda=[torch.zeros(4, dtype=torch.uint8)])
    with caplog.at_level(logging.WARNING):
        checkpoint.set_rng_state(old)
    assert "no CUDA RNG state for cuda:1" in caplog.text
