"""Knowledge distillation (``train --teacher``): the loss against a hand computation, the step that runs the teacher
(no gradients into it, its autocast, the batch mixup made), the refusals of teachers that do not fit the student,
and a distilled MobileNet run from a ResNet teacher that logs the teacher's time, keeps the teacher out of its
checkpoints, resumes exactly and runs as 2 DDP processes as it does in one."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from common import config
from common.checkpoint import atomic_save, load_checkpoint
from common.distill import Distiller, build_distiller
from common.errors import UserError
from common.logger import read_log
from common.losses import DistillationLoss, MultiLabelLoss, distillation_term
from common.registry import create_model
from common.step import Optimization, Precision, StepRunner
from tests.conftest import FAST_TRAIN, make_tree, run_cli
from tests.test_multilabel import make_multilabel
from tests.test_resume_and_ddp import assert_same_parameters, epoch_losses, final_metrics, launch_two

# ------------------------------------------------------------------------------------------------------------
# The loss, worked by hand


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


STUDENT = np.array([[2.0, -1.0, 0.5], [0.0, 1.5, -0.5]])
TEACHER = np.array([[3.0, 0.0, -1.0], [-1.0, 2.0, 1.0]])
LABELS = np.array([0, 2])


def test_distillation_term_is_t_squared_times_the_kl_divergence_of_the_softened_outputs():
    """T^2 x sum_c p_t log(p_t / p_s), averaged over the two images, from numpy's exp and log."""
    for temperature in (1.0, 4.0):
        p_t, p_s = softmax(TEACHER / temperature), softmax(STUDENT / temperature)
        by_hand = temperature**2 * np.mean(np.sum(p_t * np.log(p_t / p_s), axis=1))
        got = distillation_term(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature)
        assert got.item() == pytest.approx(by_hand, rel=1e-6)
    # Identical outputs: nothing to learn from the teacher.
    assert distillation_term(torch.tensor(TEACHER), torch.tensor(TEACHER), 4.0).item() == pytest.approx(0, abs=1e-7)


def test_the_loss_mixes_the_usual_cross_entropy_and_the_distillation_term_by_alpha():
    alpha, temperature = 0.3, 2.0
    cross_entropy = -np.mean(np.log(softmax(STUDENT)[np.arange(2), LABELS]))
    p_t, p_s = softmax(TEACHER / temperature), softmax(STUDENT / temperature)
    kd = temperature**2 * np.mean(np.sum(p_t * np.log(p_t / p_s), axis=1))
    student = torch.tensor(STUDENT)
    usual = nn.CrossEntropyLoss()(student, torch.tensor(LABELS))
    got = DistillationLoss(alpha, temperature)(usual, student, torch.tensor(TEACHER))
    assert got.item() == pytest.approx((1 - alpha) * cross_entropy + alpha * kd, rel=1e-6)
    # alpha 0 is the usual loss itself, to the bit.
    assert torch.equal(DistillationLoss(0.0, temperature)(usual, student, torch.tensor(TEACHER)), usual)


def test_multi_label_distillation_is_the_kl_divergence_of_each_labels_two_outcomes():
    """Each label a Bernoulli of sigmoid(logit / T): KL summed over its two outcomes, averaged over labels and
    images (as the binary cross-entropy is), times T^2."""
    temperature = 2.0
    sigmoid = 1 / (1 + np.exp(-np.array([STUDENT, TEACHER]) / temperature))
    q, p = sigmoid  # student, teacher
    by_hand = temperature**2 * np.mean(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)))
    got = distillation_term(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature, multilabel=True)
    assert got.item() == pytest.approx(by_hand, rel=1e-6)


# ------------------------------------------------------------------------------------------------------------
# The step: gradients, autocast, mixup


def tiny(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes))  # fmt: skip


def runner(model: nn.Module, distiller: Distiller | None, criterion=None, precision=Precision(), mixup=0.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       torch.amp.GradScaler("cpu", enabled=False))  # fmt: skip
    return StepRunner(model, criterion or nn.CrossEntropyLoss(), opt, precision, mixup, distiller=distiller)


def test_alpha_zero_trains_as_without_a_teacher_and_no_gradient_reaches_the_teacher():
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    teacher = tiny(1).eval()  # requires_grad left on: no_grad alone must keep the teacher out of autograd
    before = copy.deepcopy(teacher.state_dict())
    alone, zero, distilled = tiny(0), tiny(0), tiny(0)
    steps = [runner(alone, None), runner(zero, Distiller(teacher, DistillationLoss(0.0, 4.0), images.device)),
             runner(distilled, Distiller(teacher, DistillationLoss(1.0, 4.0), images.device))]  # fmt: skip
    losses = [step(images, labels)[0] for step in steps]
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(alone.parameters(), zero.parameters(), strict=True):
        assert torch.equal(a, b)
    # alpha 1: the loss is the distillation term alone, and it moves the student elsewhere.
    assert not torch.allclose(losses[2], losses[0])
    assert any(not torch.equal(a, b) for a, b in zip(alone.parameters(), distilled.parameters(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm statistics untouched


class Recorder(nn.Module):
    """A teacher that records the images it was given and the dtype of its answer."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.linear = nn.Linear(3, classes)
        self.seen: list[torch.Tensor] = []
        self.dtypes: list[torch.dtype] = []

    def forward(self, x):
        self.seen.append(x.clone())
        out = self.linear(x.mean((2, 3)))
        self.dtypes.append(out.dtype)
        return out


def test_the_teacher_sees_the_mixed_batch_under_the_students_autocast():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    teacher = Recorder()
    step = runner(tiny(0), Distiller(teacher, DistillationLoss(0.5, 4.0), images.device),
                  precision=Precision(True, "bfloat16"), mixup=0.4)  # fmt: skip
    np.random.seed(7)
    loss, _ = step(images, labels)
    np.random.seed(7)
    lam = float(np.random.beta(0.4, 0.4))  # the draw the step made
    expected = images * lam + images.roll(1, 0) * (1 - lam)
    torch.testing.assert_close(teacher.seen[0].float(), expected)
    assert teacher.dtypes == [torch.bfloat16]  # its linear layer ran under the student's autocast
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert step.distiller.timer.seconds() > 0


def test_multi_label_students_distil_through_the_binary_form():
    images, targets = torch.randn(4, 3, 8, 8), torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    teacher = tiny(1).eval()
    student = tiny(0)
    step = runner(student, Distiller(teacher, DistillationLoss(0.5, 2.0, multilabel=True), images.device),
                  criterion=MultiLabelLoss())  # fmt: skip
    loss, _ = step(images, targets)
    with torch.no_grad():
        usual = MultiLabelLoss()(tiny(0)(images), targets)
        expected = 0.5 * usual + 0.5 * distillation_term(tiny(0)(images), teacher(images), 2.0, multilabel=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Teachers that do not fit, and a real distilled run


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """96 train and 32 val images: 6 steps of 16 an epoch (3 for each of 2 ranks)."""
    return make_tree(tmp_path_factory.mktemp("distill"), train_per_class=24, val_per_class=8, mixed_modes=False)


@pytest.fixture(scope="module")
def teacher(tree, tmp_path_factory) -> Path:
    """A ResNet-18 of ours trained for one epoch on ``tree``: its best.pt."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_cli("train", "--data", str(tree), "--data-backend", "pytorch", "--epochs", "1", "--output", str(out),
            *FAST_TRAIN)  # fmt: skip
    return out / "best.pt"


def edited(teacher: Path, folder: Path, **changes) -> Path:
    """A copy of the teacher's checkpoint with ``changes`` (to its config, or its class names)."""
    state = load_checkpoint(teacher)
    state["class_names"] = changes.pop("class_names", state["class_names"])
    state["config"] = state["config"] | changes
    path = folder / "edited.pt"
    atomic_save(state, path)
    return path


def student_args(tree: Path, teacher: Path | str, *extra: str) -> list[str]:
    return ["train", "--data", str(tree), "--data-backend", "pytorch", "--epochs", "1", *FAST_TRAIN,
            "--arch", "mobilenet_v1", "--width-mult", "0.25", "--teacher", str(teacher), *extra]  # fmt: skip


def test_teachers_that_do_not_fit_the_student_are_refused_by_name(tree, teacher, tmp_path, cli):
    def refused(data: Path, path: Path, *extra: str) -> str:
        proc = cli(*student_args(data, path, "--output", str(tmp_path / "out"), *extra), check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert not (tmp_path / "out" / "checkpoint_epoch_0000.pt").exists()
        return proc.stderr

    other = make_tree(tmp_path / "other", train_per_class=4, val_per_class=2, mixed_modes=False)
    shutil.rmtree(other / "train" / "yellow")
    shutil.rmtree(other / "val" / "yellow")
    (other / "train" / "red").rename(other / "train" / "crimson")
    (other / "val" / "red").rename(other / "val" / "crimson")
    err = refused(other, teacher, "--batch-size", "4")
    assert f"--teacher {teacher} was trained on other classes than {other}/train" in err
    assert "only the teacher has red, yellow; only the student has crimson" in err

    shuffled = edited(teacher, tmp_path, class_names=["blue", "green", "yellow", "red"])
    assert "the same names in another order" in refused(tree, shuffled)

    err = refused(tree, teacher, "--num-classes", "5")
    assert f"--teacher {teacher} has 4 outputs and the student 5 (--num-classes)" in err

    multi_teacher = edited(teacher, tmp_path, multilabel=True)
    err = refused(tree, multi_teacher)
    assert f"--teacher {multi_teacher} was trained on multi-label data (a sigmoid per label), the student's" in err

    multi_data = make_multilabel(tmp_path / "multi", n_train=16, n_val=4)
    err = refused(multi_data, teacher)
    assert f"--teacher {teacher} was trained on single-label data (a softmax over classes)" in err

    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert f"--teacher: checkpoint {garbage} cannot be read" in refused(tree, garbage)
    weights_only = tmp_path / "weights.pt"
    torch.save(create_model("resnet18", num_classes=4).state_dict(), weights_only)
    assert f"checkpoint {weights_only} is not a convnets training checkpoint" in refused(tree, weights_only)
    assert "does not exist" in refused(tree, tmp_path / "missing.pt")


def test_the_teacher_is_loaded_without_drawing_from_the_runs_generators(tree, teacher, caplog):
    """Loading builds a randomly initialised model before its weights arrive: that must not move the student's
    random streams, or a distilled run and its run alone would start from different weights."""
    cfg = config.TrainConfig(data=str(tree), teacher=str(teacher), memory_format="channels_last")
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="convnets"):
        distiller = build_distiller(cfg, ["blue", "green", "red", "yellow"], 4, False, 24, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    model = distiller.teacher
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert "the teacher was trained at 32 px and sees the student's 24 px batches" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="convnets"):
        assert build_distiller(config.TrainConfig(distill_alpha=0.9), [], 4, False, 32, torch.device("cpu")) is None
    assert "--distill-alpha without --teacher" in caplog.text
    for bad, said in (({"distill_alpha": 1.5}, "--distill-alpha is the teacher's share"),
                      ({"distill_temperature": 0.0}, "--distill-temperature must be positive")):  # fmt: skip
        with pytest.raises(UserError, match=said):
            config.resolve(config.TrainConfig, bad)


def test_a_distilled_run_logs_the_teacher_keeps_it_out_of_checkpoints_and_resumes_exactly(tree, teacher, tmp_path,
                                                                                          cli):  # fmt: skip
    """A MobileNet distilled from the ResNet, with mixup, label smoothing and channels_last, stopped after its first
    epoch (its last checkpoint removed, as a kill leaves it) and resumed: it ends as the uninterrupted run."""
    args = student_args(tree, teacher, "--epochs", "2", "--deterministic", "--seed", "3", "--mixup", "0.2",
                        "--label-smoothing", "0.1", "--memory-format", "channels_last", "--ema-decay", "0.9",
                        "--distill-alpha", "0.7", "--distill-temperature", "3")  # fmt: skip
    whole, again = tmp_path / "whole", tmp_path / "again"
    run_cli(*args, "--output", str(whole))
    records = read_log(whole / "log.json")
    steps = [r["data"] for r in records if len(r["step"]) == 2]
    epochs = [r["data"] for r in records if len(r["step"]) == 1]
    assert len(steps) == 12 and all(s["train.teacher_time"] > 0 for s in steps + epochs)

    state = load_checkpoint(whole / "checkpoint_epoch_0001.pt")
    assert state["config"]["teacher"] == str(teacher)
    assert (state["config"]["distill_alpha"], state["config"]["distill_temperature"]) == (0.7, 3.0)
    student = create_model("mobilenet_v1", num_classes=4, width_mult=0.25)
    assert state["model"].keys() == student.state_dict().keys()  # the student's weights, none of the teacher's
    assert not any("teacher" in key for key in state)

    shutil.copytree(whole, again)
    (again / "checkpoint_epoch_0001.pt").unlink()
    (again / "best.pt").unlink()
    # A resume must distil as the run did: another alpha, or no teacher at all, is refused.
    proc = cli(*args[:-4], "--distill-temperature", "3", "--output", str(again), "--resume", "auto", check=False)
    assert proc.returncode == 2 and "(--distill-alpha 0.7 -> 0.5)" in proc.stderr, proc.stderr
    no_teacher = [a for a in args if a not in ("--teacher", str(teacher))]
    proc = cli(*no_teacher, "--output", str(again), "--resume", "auto", check=False)
    assert proc.returncode == 2 and f"was trained with --teacher {teacher}, and this command gives no" in proc.stderr

    resumed = run_cli(*args, "--output", str(again), "--resume", "auto")
    assert "resumed from" in resumed.stdout and "epoch 1" in resumed.stdout
    a, b = final_metrics(whole), final_metrics(again)
    for key in ("val.top1", "val.top5", "val_ema.top1"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert b["val.loss"] == pytest.approx(a["val.loss"], rel=1e-4)
    assert epoch_losses(again)[1] == pytest.approx(epoch_losses(whole)[1], rel=1e-4)
    name = "checkpoint_epoch_0001.pt"
    assert_same_parameters(load_checkpoint(whole / name)["model"], load_checkpoint(again / name)["model"], tol=1e-5)


def test_two_distilling_processes_match_one_with_the_same_global_batch(tree, teacher, tmp_path):
    """DDP wraps the student alone; each rank's teacher scores that rank's micro-batch, which is micro-batch r of
    the single process accumulating 2 x 16 (as in tests/test_resume_and_ddp.py): the same losses and weights."""
    common = [*student_args(tree, teacher, "--deterministic", "--optimizer-batch-size", "32", "--lr", "0.05")][1:]
    run_cli("train", *common, "--output", str(tmp_path / "one"))
    proc = launch_two("train", *common, "--output", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = load_checkpoint(tmp_path / "one" / "checkpoint_epoch_0000.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoint_epoch_0000.pt")
    assert two["config"]["world_size"] == 2 and one["config"]["accumulation"] == 2
    assert epoch_losses(tmp_path / "two")[0] == pytest.approx(epoch_losses(tmp_path / "one")[0], rel=1e-4)
    params = {k: v for k, v in one["model"].items() if "running_" not in k and "num_batches" not in k}
    assert_same_parameters(params, {k: two["model"][k] for k in params}, tol=1e-4)
    assert two["model"].keys() == one["model"].keys()
