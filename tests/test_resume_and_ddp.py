"""Kill-and-resume exactness and the 2-process DDP run against one process with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.logger import read_log
from tests.conftest import FAST_TRAIN, ROOT, run_cli


def final_metrics(out):
    return [r["data"] for r in read_log(out / "log.json") if r["step"] == [] and "val.top1" in r["data"]][-1]


def epoch_losses(out):
    return {r["step"][0]: r["data"]["train.loss"] for r in read_log(out / "log.json") if len(r["step"]) == 1}


def assert_same_parameters(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
def test_kill_and_resume_ends_like_an_uninterrupted_run(image_tree, tmp_path, backend):
    args = ["train", "--data", str(image_tree), "--data-backend", backend, "--epochs", "3", "--deterministic",
            "--seed", "3", "--mixup", "0.2", "--ema-decay", "0.9", *FAST_TRAIN]  # fmt: skip
    run_cli(*args, "--output", str(tmp_path / "whole"))

    # Kill -9 in the middle of the second epoch, after the first epoch's checkpoint exists.
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "common", *args, "--output", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = out / "log.json"
        if log.exists() and any(r["step"][:1] == [1] and len(r["step"]) == 2 and r["step"][1] >= 4
                                for r in read_log(log) if isinstance(r["step"], list)):  # fmt: skip
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint_epoch_0000.pt").exists() and not (out / "checkpoint_epoch_0001.pt").exists()

    resumed = run_cli(*args, "--output", str(out), "--resume", "auto")
    assert "resumed from" in resumed.stdout and "epoch 1" in resumed.stdout
    whole, again = final_metrics(tmp_path / "whole"), final_metrics(out)
    for key in ("val.top1", "val.top5", "val_ema.top1"):
        assert again[key] == pytest.approx(whole[key], abs=1e-6), key
    assert again["val.loss"] == pytest.approx(whole["val.loss"], rel=1e-4)
    assert epoch_losses(out)[2] == pytest.approx(epoch_losses(tmp_path / "whole")[2], rel=1e-4)
    assert_same_parameters(
        load_checkpoint(tmp_path / "whole" / "checkpoint_epoch_0002.pt")["model"],
        load_checkpoint(out / "checkpoint_epoch_0002.pt")["model"],
        tol=1e-4,
    )


def test_resume_auto_falls_back_past_a_corrupt_checkpoint(image_tree, tmp_path):
    args = ["train", "--data", str(image_tree), "--data-backend", "pytorch", "--output", str(tmp_path),
            *FAST_TRAIN, "--max-steps-per-epoch", "2"]  # fmt: skip
    run_cli(*args, "--epochs", "2")
    newest = tmp_path / "checkpoint_epoch_0001.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as a crash during a copy would leave it
    proc = run_cli(*args, "--epochs", "3", "--resume", "auto")
    assert f"checkpoint {newest} cannot be read" in proc.stdout
    assert "resumed from" in proc.stdout and "checkpoint_epoch_0000.pt at epoch 1" in proc.stdout
    assert load_checkpoint(tmp_path / "checkpoint_epoch_0002.pt")["epoch"] == 2


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(image_tree, tmp_path):
    """2 processes x 16 images against 1 process accumulating 2 x 16: rank r's batch is micro-batch r of the
    single process (see data.train_shard), so BatchNorm sees the same images and the gradients are equal."""
    # A gentle lr: at lr 0.2 and batch 16 the run is chaotic enough to blow float noise (the order in which
    # gradients are summed) up to visible loss differences within a few steps.
    common = ["--data", str(image_tree), "--data-backend", "pytorch", "--epochs", "2", "--deterministic",
              "--optimizer-batch-size", "32", *FAST_TRAIN, "--lr", "0.05"]  # fmt: skip
    # Each of the 2 ranks computes with 1 thread (distributed.init_distributed); so does the single process.
    run_cli("train", *common, "--output", str(tmp_path / "one"), env={"OMP_NUM_THREADS": "1"})
    proc = subprocess.run(
        ["bash", str(ROOT / "common" / "launch.sh"), "2", "train", *common, "--output", str(tmp_path / "two")],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = load_checkpoint(tmp_path / "one" / "best.pt"), load_checkpoint(tmp_path / "two" / "best.pt")
    assert two["config"]["world_size"] == 2 and one["config"]["accumulation"] == 2
    assert one["step"] == two["step"]
    losses_one, losses_two = epoch_losses(tmp_path / "one"), epoch_losses(tmp_path / "two")
    for epoch in (0, 1):
        assert losses_two[epoch] == pytest.approx(losses_one[epoch], rel=1e-4)
    # Running BN statistics differ by design (each rank tracks its own micro-batches); parameters must not.
    params = {k: v for k, v in one["model"].items() if "running_" not in k and "num_batches" not in k}
    assert_same_parameters(params, {k: two["model"][k] for k in params}, tol=1e-4)


def test_two_process_resume_gives_each_rank_its_own_random_streams(image_tree, tmp_path):
    """Mixup draws its mixing weight from each rank's NumPy generator: a resume that handed every rank the
    generators of rank 0 would mix rank 1's images differently from the uninterrupted run."""
    common = ["train", "--data", str(image_tree), "--data-backend", "pytorch", "--epochs", "2", "--deterministic",
              "--mixup", "0.4", "--max-steps-per-epoch", "4", *FAST_TRAIN, "--workers", "0"]  # fmt: skip
    launch = ["bash", str(ROOT / "common" / "launch.sh"), "2"]
    env = {**os.environ, "PYTHON": sys.executable}
    out = tmp_path / "run"
    proc = subprocess.run([*launch, *common, "--output", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    whole = load_checkpoint(out / "checkpoint_epoch_0001.pt")
    assert len(whole["rng"]) == 2

    # As if killed after the first epoch's checkpoint: drop what the second epoch wrote, then resume.
    (out / "checkpoint_epoch_0001.pt").unlink()
    proc = subprocess.run([*launch, *common, "--output", str(out), "--resume", "auto"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr
    again = load_checkpoint(out / "checkpoint_epoch_0001.pt")
    assert_same_parameters(whole["model"], again["model"], tol=1e-6)


def test_two_processes_share_the_image_check(fresh_tree, tmp_path):
    """Each rank checks half of the files; the bad ones either rank found are left out on both, so their
    shards still split the same list."""
    bad = [fresh_tree / "train" / "red" / "zero.png", fresh_tree / "train" / "blue" / "zero.png"]
    for path in bad:
        path.write_bytes(b"")
    launch = ["bash", str(ROOT / "common" / "launch.sh"), "2", "train", "--data", str(fresh_tree),
              "--data-backend", "pytorch", "--epochs", "1", *FAST_TRAIN, "--workers", "0"]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([*launch, "--output", str(tmp_path / "a")], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode != 0 and all(str(path) in proc.stderr for path in bad), proc.stderr
    proc = subprocess.run([*launch, "--skip-bad-images", "--output", str(tmp_path / "b")], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "leaving out 2 file(s)" in proc.stdout
