"""Fine-tuning on small data sets: the two-stage schedule (head, then everything at a lower backbone lr), its
resume, class-balanced loss and the recipes' finetune profiles. Pretrained weights are a local file (no network)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torchvision

from common import config
from common.checkpoint import load_checkpoint
from common.errors import UserError
from common.logger import read_log
from common.registry import get_model_spec
from tests.conftest import ROOT, make_tree

TINY = {"arch": "resnet18", "image_size": 32, "batch_size": 8, "workers": 0, "data_backend": "pytorch",
        "max_steps_per_epoch": 2, "eval_every": 10, "print_freq": 1, "deterministic": True, "seed": 1,
        "warmup_epochs": 0.0, "lr": 0.1, "image_check": "none", "label_smoothing": 0.0}  # fmt: skip


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    """4 classes of 8 training and 4 validation images: these tests time steps, not accuracy."""
    return make_tree(tmp_path_factory.mktemp("small"), train_per_class=8, val_per_class=4, mixed_modes=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """torchvision's resnet18 (1000 classes, random weights) saved as its hub weights are: a raw state_dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return str(path)


def run(data, out, preset: str | None = None, profile: str | None = None, **overrides) -> None:
    from common.engine import train

    cli = {**TINY, "data": str(data), "output": str(out), **overrides}
    train(config.resolve(config.TrainConfig, cli, preset, profile))


RESNET_PRESET = str(ROOT / "resnet50" / "preset.toml")


def backbone_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def test_two_stages_train_the_head_first_then_everything_and_resume_in_stage_two(small_tree, pretrained, tmp_path):
    """Through resnet50's finetune profile (its 2 head epochs of 15 fitted to a 2-epoch run: 1), with --balance
    and --positive-class."""
    whole = tmp_path / "whole"
    finetune = {"preset": RESNET_PRESET, "profile": "finetune", "pretrained": pretrained, "epochs": 2,
                "balance": True, "positive_class": "red"}  # fmt: skip
    run(small_tree, whole, **finetune)
    final = [r["data"] for r in read_log(whole / "log.json") if r["step"] == []][-1]
    for key in ("val.precision", "val.recall", "val.f1", "val.roc_auc"):
        assert 0 <= final[key] <= 1, key
    start = torch.load(pretrained)
    first = load_checkpoint(whole / "checkpoint_epoch_0000.pt")
    # Stage 1: the backbone, its BatchNorm statistics included, is exactly the pretrained one; the head moved.
    for key, value in backbone_of(first["model"]).items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, start[key]), key
    last = load_checkpoint(whole / "checkpoint_epoch_0001.pt")
    assert not torch.equal(last["model"]["fc.weight"], first["model"]["fc.weight"])
    # Stage 2: the backbone trains, at a tenth of the head's learning rate.
    assert not torch.equal(last["model"]["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])
    assert not torch.equal(last["model"]["bn1.running_mean"], start["bn1.running_mean"])
    head_lr, *_, backbone_lr = [g["lr"] for g in last["optimizer"]["param_groups"]]
    assert backbone_lr == pytest.approx(0.1 * head_lr)

    # Interrupted after stage 1: the resumed run is in stage 2 at once and ends as the uninterrupted one.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(whole / "checkpoint_epoch_0000.pt", resumed)
    run(small_tree, resumed, **finetune, resume="auto")
    again = load_checkpoint(resumed / "checkpoint_epoch_0001.pt")["model"]
    for key, value in last["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(again[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_freeze_epochs_are_checked_and_fitted_to_a_short_run():
    base = {"data": "x", "epochs": 3}
    with pytest.raises(UserError, match="leaves none of the 3 epochs"):
        config.resolve(config.TrainConfig, {**base, "freeze_backbone_epochs": 3})
    with pytest.raises(UserError, match="pass one of them"):
        config.resolve(config.TrainConfig, {**base, "freeze_backbone_epochs": 1, "freeze_backbone": True})
    # A preset's 2 head epochs of 10, in a run cut to 4 epochs: 1 head epoch.
    cfg = config.fit_schedule(config.TrainConfig(epochs=4, freeze_backbone_epochs=2), written_for=10, typed=set())
    assert cfg.freeze_backbone_epochs == 1


def test_backbone_lr_mult_groups_cover_every_parameter_once():
    from common.builders import build_model, build_optimizer

    spec = get_model_spec("resnet18")
    model = build_model(spec, 5)
    cfg = config.TrainConfig(backbone_lr_mult=0.25)
    groups = build_optimizer(model, cfg, 1.0, spec).param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    head = {id(model.fc.weight), id(model.fc.bias)}
    for g in groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1
        assert g["lr"] == (1.0 if in_head == {True} else 0.25)


def test_balance_weighs_classes_by_inverse_frequency():
    from common.losses import class_weights

    weights = class_weights([30, 10, 0], 4, torch.device("cpu"))
    # 40 images in 2 present classes: 40 / (2 x 30) and 40 / (2 x 10); the mean weight per image stays 1.
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 2.0, 1.0, 1.0]))
    assert (30 * weights[0] + 10 * weights[1]) / 40 == pytest.approx(1.0)


@pytest.mark.parametrize("recipe", ["resnet50", "mobilenet", "vgg"])
def test_every_recipe_has_a_finetune_profile_that_anneals_in_two_stages(recipe):
    cfg = config.resolve(config.TrainConfig, {}, str(ROOT / recipe / "preset.toml"), "finetune")
    spec = get_model_spec(cfg.arch)
    assert cfg.pretrained and spec.torchvision_weights  # weights exist for its model
    assert cfg.lr_schedule == "cosine" and 0 < cfg.warmup_epochs <= 0.1 * cfg.epochs <= 2
    assert 0 < cfg.freeze_backbone_epochs < cfg.epochs and 0 < cfg.backbone_lr_mult < 1
    assert 0.35 <= cfg.min_crop_scale <= 0.5
    from_scratch = config.resolve(config.TrainConfig, {}, str(ROOT / recipe / "preset.toml"))
    assert cfg.lr * cfg.backbone_lr_mult < from_scratch.lr  # pretrained features move less than fresh ones


def test_one_vs_rest_metrics_on_hand_made_cases():
    from common.metrics import one_vs_rest, roc_auc

    # Class 1 positive: 8 images of it, 6 found (recall 3/4); 2 of the 8 images predicted 1 are others (precision 3/4).
    confusion = [[10, 1, 0], [1, 6, 1], [0, 1, 5]]
    assert one_vs_rest(confusion, 1) == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75})
    assert one_vs_rest([[5, 0], [3, 0]], 1) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # never predicted
    # Positives 0.9, 0.4, 0.4; negatives 0.8, 0.4, 0.1: 9 pairs, 0.9 beats all 3, each 0.4 beats 0.1 (2) and ties
    # one 0.4 (2 x 0.5): (3 + 2 + 1) / 9.
    assert roc_auc([0.9, 0.4, 0.4, 0.8, 0.4, 0.1], [1, 1, 1, 0, 0, 0]) == pytest.approx(6 / 9)
    assert roc_auc([0.2, 0.3, 0.9], [0, 0, 1]) == 1.0 and roc_auc([0.9, 0.3], [0, 1]) == 0.0
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_positive_class_must_be_a_class_folder(small_tree, tmp_path):
    with pytest.raises(UserError, match="'purple' is not one of the class folders: blue, green, red, yellow"):
        run(small_tree, tmp_path / "bad", epochs=1, positive_class="purple")


def test_learning_curve_subsets_are_stratified_and_nested():
    from common.learning_curve import parse_fractions, stratified_subsets

    assert parse_fractions("0.5, 0.1,1.0") == [0.1, 0.5, 1.0]
    for bad in ("1.0", "0.1,1.5", "a,b"):
        with pytest.raises(UserError, match="--fractions"):
            parse_fractions(bad)
    labels = [0] * 40 + [1] * 8 + [2] * 2
    small, half, whole = stratified_subsets(labels, [0.1, 0.5, 1.0], seed=0)
    counts = [np.bincount(np.asarray(labels)[s], minlength=3).tolist() for s in (small, half, whole)]
    assert counts == [[4, 1, 1], [20, 4, 1], [40, 8, 2]]  # every class in every subset
    assert set(small) <= set(half) <= set(whole) == set(range(50))


def test_learning_curve_verdict():
    from common.learning_curve import verdict

    assert verdict([100, 200, 400], [60.0, 70.0, 75.0]).startswith("still rising")
    assert verdict([100, 200, 400], [60.0, 70.0, 70.5]).startswith("flat")
    assert verdict([100, 1000], [60.0, 62.0]).startswith("flat")  # 2 points over 3.3 doublings


def test_learning_curve_writes_table_plot_and_verdict(small_tree, tmp_path, monkeypatch):
    from PIL import Image

    from common.data import checks
    from common.learning_curve import run_learning_curve

    opened = []
    inspect = checks.inspect_image
    monkeypatch.setattr(checks, "inspect_image", lambda path, full=True: opened.append(path) or inspect(path, full))
    cfg = config.resolve(config.LearningCurveConfig, {**TINY, "data": str(small_tree), "output": str(tmp_path),
                                                      "fractions": "0.25,1.0", "epochs": 1, "max_steps_per_epoch": 1,
                                                      "image_check": "full"})  # fmt: skip
    result = run_learning_curve(cfg)
    # DATA's 32 training and 16 validation images are checked once; neither point's run opens one again.
    assert sorted(opened) == sorted(str(p) for p in small_tree.rglob("*.png"))
    assert [r["train_images"] for r in result["rows"]] == [8, 32]
    assert result["verdict"].split(":")[0] in ("still rising", "flat")
    report = (tmp_path / "learning_curve.md").read_text()
    assert "| 0.25 | 8 |" in report and result["verdict"] in report
    with Image.open(tmp_path / "learning_curve.png") as plot:
        assert plot.size == (500, 350)
    # The subset is an ImageFolder of links into the data set, validated on the whole val/.
    linked = sorted((tmp_path / "subsets" / "fraction_0.25" / "train").rglob("*.png"))
    assert len(linked) == 8 and all(p.is_symlink() for p in linked)
    # Run again into the same folder: each finished point is read back, not refused or retrained.
    again = run_learning_curve(cfg)
    assert again["rows"] == result["rows"]
    assert len(opened) == 48
