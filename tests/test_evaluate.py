"""``convnets evaluate`` of a single-label checkpoint with ``--positive-class``: one-vs-rest metrics that agree with
the confusion matrix it writes, the class defaulting to the training run's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import config
from common.errors import UserError
from tests.conftest import make_tree


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_torch_thread):
    from common.engine import train

    data = make_tree(tmp_path_factory.mktemp("data"), train_per_class=8, val_per_class=6, mixed_modes=False)
    out = tmp_path_factory.mktemp("run")
    cli = {"data": str(data), "output": str(out), "arch": "resnet18", "image_size": 32, "batch_size": 8,
           "workers": 0, "data_backend": "pytorch", "epochs": 2, "lr": 0.1, "warmup_epochs": 0.0,
           "image_check": "none", "positive_class": "red", "seed": 0}  # fmt: skip
    train(config.resolve(config.TrainConfig, cli))
    return data, out / "best.pt"


def evaluate(checkpoint, data, out, **extra) -> dict:
    from common.inference import run_evaluate

    cli = {"checkpoint": str(checkpoint), "data": str(data), "output": str(out), "data_backend": "pytorch",
           "workers": 0, "json": True, **extra}  # fmt: skip
    return run_evaluate(config.resolve(config.EvaluateConfig, cli))


@pytest.mark.parametrize("given", [None, "blue"])
def test_positive_class_metrics_agree_with_the_confusion_matrix(checkpoint, tmp_path, given):
    data, ckpt = checkpoint
    metrics = evaluate(ckpt, data, tmp_path, **({"positive_class": given} if given else {}))
    name = given or "red"  # without the option: the class the run was trained to report
    assert metrics["positive_class"] == name
    confusion = np.array(json.loads((tmp_path / "metrics.json").read_text())["confusion"])
    classes = sorted(["red", "green", "blue", "yellow"])
    p = classes.index(name)
    tp = confusion[p, p]
    assert metrics["precision"] == pytest.approx(tp / confusion[:, p].sum() if confusion[:, p].sum() else 0.0)
    assert metrics["recall"] == pytest.approx(tp / confusion[p].sum())
    assert 0.0 <= metrics["roc_auc"] <= 1.0


def test_unknown_positive_class_is_named(checkpoint, tmp_path):
    data, ckpt = checkpoint
    with pytest.raises(UserError, match="--positive-class 'purple' is not one of the checkpoint's classes"):
        evaluate(ckpt, data, tmp_path, positive_class="purple")
