"""Kill-and-resume exactness and the 2-process DDP run against one process with the same global batch.

Every test here starts real processes (a kill -9, torchrun), and each start costs seconds of imports on a small
machine: the trees are small and behaviours that share a run are checked on the same run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.logger import read_log
from tests.conftest import FAST_TRAIN, ONE_THREAD, ROOT, make_tree, run_cli


def final_metrics(out):
    return [r["data"] for r in read_log(out / "log.json") if r["step"] == [] and "val.top1" in r["data"]][-1]


def epoch_losses(out):
    return {r["step"][0]: r["data"]["train.loss"] for r in read_log(out / "log.json") if len(r["step"]) == 1}


def assert_same_parameters(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    """96 train and 32 val images: 6 steps of 16 an epoch (3 for each of 2 ranks), enough to kill a run
    mid-epoch, at half the cost of ``image_tree``."""
    return make_tree(tmp_path_factory.mktemp("small"), train_per_class=24, val_per_class=8)


def resume_args(tree: Path, backend: str, epochs: int) -> list[str]:
    return ["train", "--data", str(tree), "--data-backend", backend, "--epochs", str(epochs), "--deterministic",
            "--seed", "3", "--mixup", "0.2", "--ema-decay", "0.9", *FAST_TRAIN]  # fmt: skip


def assert_ends_alike(whole: Path, again: Path, epoch: int) -> None:
    """Same final metrics, last epoch's loss and parameters as the uninterrupted run in ``whole``."""
    a, b = final_metrics(whole), final_metrics(again)
    for key in ("val.top1", "val.top5", "val_ema.top1"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert b["val.loss"] == pytest.approx(a["val.loss"], rel=1e-4)
    assert epoch_losses(again)[epoch] == pytest.approx(epoch_losses(whole)[epoch], rel=1e-4)
    name = f"checkpoint_epoch_{epoch:04d}.pt"
    assert_same_parameters(load_checkpoint(whole / name)["model"], load_checkpoint(again / name)["model"], tol=1e-4)


def test_kill_and_resume_ends_like_an_uninterrupted_run(small_tree, tmp_path):
    """kill -9 in the middle of an epoch, then ``--resume auto``: the interrupted epoch is replayed exactly and
    the run ends as an uninterrupted one, a further epoch included. On the pytorch backend; the dali-cpu
    backend's replay is checked by the next test, without the kill (which the process sees, not the backend)."""
    args = resume_args(small_tree, "pytorch", epochs=3)
    run_cli(*args, "--output", str(tmp_path / "whole"))

    # Kill -9 in the middle of the second epoch, after the first epoch's checkpoint exists.
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, "-m", "common", *args, "--output", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = out / "log.json"
        if log.exists() and any(r["step"][:1] == [1] and len(r["step"]) == 2 and r["step"][1] >= 2
                                for r in read_log(log) if isinstance(r["step"], list)):  # fmt: skip
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint_epoch_0000.pt").exists() and not (out / "checkpoint_epoch_0001.pt").exists()

    resumed = run_cli(*args, "--output", str(out), "--resume", "auto")
    assert "resumed from" in resumed.stdout and "epoch 1" in resumed.stdout
    assert_ends_alike(tmp_path / "whole", out, epoch=2)


def test_dali_resume_replays_the_epoch_and_falls_back_past_a_corrupt_checkpoint(small_tree, tmp_path):
    """``--resume auto`` on the dali-cpu backend, past a truncated newest checkpoint (as a crash during a copy
    would leave it): the run names the unreadable file, restarts from the epoch before, and replays that epoch
    as the uninterrupted run did."""
    args = resume_args(small_tree, "dali-cpu", epochs=2)
    whole, out = tmp_path / "whole", tmp_path / "resumed"
    run_cli(*args, "--output", str(whole))
    shutil.copytree(whole, out)
    newest = out / "checkpoint_epoch_0001.pt"
    newest.write_bytes(newest.read_bytes()[:1000])

    proc = run_cli(*args, "--output", str(out), "--resume", "auto")
    assert f"checkpoint {newest} cannot be read" in proc.stdout
    assert "resumed from" in proc.stdout and "checkpoint_epoch_0000.pt at epoch 1" in proc.stdout
    assert load_checkpoint(newest)["epoch"] == 1
    assert_ends_alike(whole, out, epoch=1)


def launch_two(*args: str) -> subprocess.CompletedProcess:
    """``bash common/launch.sh 2 ARGS``: torchrun with 2 processes (gloo on the CPU)."""
    return subprocess.run(["bash", str(ROOT / "common" / "launch.sh"), "2", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, "PYTHON": sys.executable})  # fmt: skip


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(small_tree, tmp_path):
    """2 processes x 16 images against 1 process accumulating 2 x 16: rank r's batch is micro-batch r of the
    single process (see data.train_shard), so BatchNorm sees the same images and the gradients are equal."""
    # A gentle lr: at lr 0.2 and batch 16 the run is chaotic enough to blow float noise (the order in which
    # gradients are summed) up to visible loss differences within a few steps.
    common = ["--data", str(small_tree), "--data-backend", "pytorch", "--epochs", "2", "--deterministic",
              "--optimizer-batch-size", "32", *FAST_TRAIN, "--lr", "0.05"]  # fmt: skip
    # Each of the 2 ranks computes with 1 thread (distributed.init_distributed); so does the single process
    # (run_cli's ONE_THREAD).
    run_cli("train", *common, "--output", str(tmp_path / "one"))
    proc = launch_two("train", *common, "--output", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The last epoch's checkpoints, not best.pt: validation uses the running BN statistics, which differ by design
    # (below), so the two runs may pick their best epochs differently.
    last = "checkpoint_epoch_0001.pt"
    one, two = load_checkpoint(tmp_path / "one" / last), load_checkpoint(tmp_path / "two" / last)
    assert two["config"]["world_size"] == 2 and one["config"]["accumulation"] == 2
    assert one["step"] == two["step"]
    losses_one, losses_two = epoch_losses(tmp_path / "one"), epoch_losses(tmp_path / "two")
    for epoch in (0, 1):
        assert losses_two[epoch] == pytest.approx(losses_one[epoch], rel=1e-4)
    # Running BN statistics differ by design (each rank tracks its own micro-batches); parameters must not.
    params = {k: v for k, v in one["model"].items() if "running_" not in k and "num_batches" not in k}
    assert_same_parameters(params, {k: two["model"][k] for k in params}, tol=1e-4)


def test_two_processes_share_the_image_check_and_resume_with_their_own_random_streams(tmp_path):
    """Two behaviours of a 2-process run, checked on one tree to save a torchrun start:

    * each rank checks half of the files; the bad ones either rank found are left out on both, so their shards
      still split the same list;
    * mixup draws its mixing weight from each rank's NumPy generator: a resume that handed every rank the
      generators of rank 0 would mix rank 1's images differently from the uninterrupted run."""
    tree = make_tree(tmp_path / "data", train_per_class=24, val_per_class=8, mixed_modes=False)  # 2 steps a rank
    bad = [tree / "train" / "red" / "zero.png", tree / "train" / "blue" / "zero.png"]
    for path in bad:
        path.write_bytes(b"")
    common = ["train", "--data", str(tree), "--data-backend", "pytorch", "--epochs", "2", "--deterministic",
              "--mixup", "0.4", *FAST_TRAIN, "--workers", "0"]  # fmt: skip
    proc = launch_two(*common, "--output", str(tmp_path / "refused"))
    assert proc.returncode != 0 and all(str(path) in proc.stderr for path in bad), proc.stderr

    out = tmp_path / "run"
    proc = launch_two(*common, "--skip-bad-images", "--output", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "leaving out 2 file(s)" in proc.stdout
    whole = load_checkpoint(out / "checkpoint_epoch_0001.pt")
    assert len(whole["rng"]) == 2

    # As if killed after the first epoch's checkpoint: drop what the second epoch wrote, then resume.
    (out / "checkpoint_epoch_0001.pt").unlink()
    proc = launch_two(*common, "--skip-bad-images", "--output", str(out), "--resume", "auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr
    again = load_checkpoint(out / "checkpoint_epoch_0001.pt")
    assert_same_parameters(whole["model"], again["model"], tol=1e-6)
