"""Multi-label data: a ``labels.csv`` per split, a sigmoid head trained with binary cross-entropy, mAP and per-label
F1 at thresholds tuned on the validation set (kept in the checkpoint for evaluate and predict)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import config
from common.checkpoint import load_checkpoint
from common.data import PipelineSpec, build_loader, scan_split
from common.errors import UserError
from common.metrics import average_precision, best_f1_threshold, multilabel_report
from tests.conftest import COLORS, run_cli, write_image

LABELS = ["red", "green", "blue"]


def make_multilabel(root, n_train=96, n_val=48, seed=0):
    """``root/{train,val}/images/*.png`` and ``labels.csv``: each image holds a random subset of three coloured
    squares on noise, and its labels are the colours present (some images have none)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            image = rng.integers(0, 90, (40, 40, 3), dtype=np.uint8)
            present = [c for c in LABELS if rng.random() < 0.45]
            for name in present:
                side = rng.integers(14, 20)
                y, x = rng.integers(0, 40 - side, 2)
                image[y : y + side, x : x + side] = COLORS[name]
            rel = f"images/{i:03d}.png"
            write_image(image, root / split / rel)
            rows.append([rel, ";".join(present)])
        with open(root / split / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", "labels"], *rows])
    return root


@pytest.fixture(scope="module")
def multilabel_data(tmp_path_factory):
    return make_multilabel(tmp_path_factory.mktemp("multilabel"))


# ------------------------------------------------------------------------------------------------------------
# Metrics, on cases worked by hand


def test_average_precision_matches_the_hand_computed_values():
    # Ranked 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg): recall 1/2 at precision 1, then 1 at 2/3.
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    # Tied scores form one threshold: one positive among three gives precision 1/3 at recall 1.
    assert average_precision([0.5, 0.5, 0.5], [1, 0, 0]) == pytest.approx(1 / 3)
    assert np.isnan(average_precision([0.3, 0.2], [0, 0]))


def test_best_f1_threshold_separates_the_chosen_scores():
    f1, threshold = best_f1_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    # Calling 0.8, 0.4 and 0.35 positive: 2 hits, 1 false alarm, F1 = 4/5; the threshold sits below 0.35.
    assert f1 == pytest.approx(0.8)
    assert 0.1 < threshold < 0.35


def test_report_uses_given_thresholds_instead_of_tuning():
    scores = np.array([[0.9, 0.2], [0.6, 0.7], [0.3, 0.8], [0.1, 0.1]])
    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    tuned = multilabel_report(scores, targets)
    assert tuned["map"] == pytest.approx(1.0) and tuned["f1_macro"] == pytest.approx(1.0)
    assert tuned["exact_match"] == 1.0
    strict = multilabel_report(scores, targets, thresholds=[0.95, 0.95])  # nothing called positive
    assert strict["f1_macro"] == 0.0 and strict["f1_micro"] == 0.0
    assert strict["map"] == pytest.approx(1.0)  # AP does not depend on thresholds
    assert strict["exact_match"] == pytest.approx(0.25)  # only the image with no label is right


# ------------------------------------------------------------------------------------------------------------
# The layout


def test_labels_csv_reads_as_multi_hot_rows(multilabel_data):
    train = scan_split(multilabel_data / "train")
    assert train.multilabel and train.classes == sorted(LABELS)
    with open(multilabel_data / "train" / "labels.csv") as f:
        rows = {r["path"]: set(filter(None, r["labels"].split(";"))) for r in csv.DictReader(f)}
    for path, row in zip(train.files, train.labels, strict=True):
        rel = str(path)[len(str(multilabel_data / "train")) + 1 :]
        assert {train.classes[i] for i in np.flatnonzero(row)} == rows[rel]
    assert train.class_counts() == [sum(c in r for r in rows.values()) for c in train.classes]


def test_bad_labels_csv_rows_are_named(tmp_path):
    root = make_multilabel(tmp_path / "d", n_train=4, n_val=2)
    with open(root / "train" / "labels.csv", "a") as f:
        f.write("images/missing.png,red\nimages/000.png,blue\n")
    with pytest.raises(UserError, match=r"labels.csv: 2 bad row.*missing.png does not exist.*000.png listed again"):
        scan_split(root / "train")
    with open(root / "val" / "labels.csv", "w") as f:
        f.write("path,labels\nimages/000.png,purple;red\nimages/001.png,\n")
    with pytest.raises(UserError, match="labels that are not among the training classes: purple"):
        scan_split(root / "val", classes=LABELS)


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
def test_both_backends_yield_float_targets_in_image_order(multilabel_data, backend):
    pytest.importorskip("nvidia.dali") if backend == "dali-cpu" else None
    images = scan_split(multilabel_data / "val")
    spec = PipelineSpec(image_size=32, resize_size=36, batch_size=16, workers=1)
    got = [labels for _, labels in build_loader(backend, images, spec, False, torch.device("cpu"))]
    targets = torch.cat(got)
    assert targets.dtype == torch.float32 and targets.shape == (len(images), 3)
    assert torch.equal(targets, torch.tensor(np.stack(images.labels), dtype=torch.float32))


# ------------------------------------------------------------------------------------------------------------
# Training, evaluate and predict


@pytest.fixture(scope="module")
def trained(multilabel_data, tmp_path_factory, one_torch_thread):
    from common.engine import train

    out = tmp_path_factory.mktemp("run")
    cli = {"data": str(multilabel_data), "output": str(out), "arch": "resnet18", "image_size": 32,
           "batch_size": 16, "workers": 0, "data_backend": "pytorch", "epochs": 4, "lr": 0.2,
           "warmup_epochs": 0.5, "weight_decay": 5e-5, "min_crop_scale": 0.6, "label_smoothing": 0.1,
           "print_freq": 100, "seed": 0, "image_check": "none", "balance": True}  # fmt: skip
    final = train(config.resolve(config.TrainConfig, cli))
    return out, final


def test_training_learns_the_labels_and_keeps_the_thresholds(trained, multilabel_data):
    out, final = trained
    # A ranking by chance gives each label an AP about its prevalence (~0.45); the colours are easy to see.
    assert final["val.map"] > 90, final
    assert "val.top1" not in final
    state = load_checkpoint(out / "best.pt")
    assert state["config"]["multilabel"] is True
    assert len(state["thresholds"]) == 3 and all(0 < t < 1 for t in state["thresholds"])
    log_lines = [json.loads(line[len("DLLL ") :]) for line in (out / "log.json").read_text().splitlines()]
    assert any("val.best_map" in r["data"] for r in log_lines)


def test_evaluate_reports_map_and_per_label_f1(trained, multilabel_data, tmp_path):
    out, final = trained
    from common.inference import run_evaluate

    cfg = config.resolve(config.EvaluateConfig, {"checkpoint": str(out / "best.pt"), "data": str(multilabel_data),
                                                 "output": str(tmp_path), "data_backend": "pytorch", "workers": 0,
                                                 "json": True})  # fmt: skip
    metrics = run_evaluate(cfg)
    assert metrics["thresholds_from"] == "checkpoint"
    assert set(metrics["per_class"]) == set(LABELS)
    assert metrics["map"] == pytest.approx(final["val.map"], abs=1e-6)  # best.pt is the last epoch's here
    assert all(0 <= c["f1"] <= 1 for c in metrics["per_class"].values())
    assert json.loads((tmp_path / "metrics.json").read_text())["map"] == metrics["map"]


def test_predict_gives_each_image_its_labels(trained, multilabel_data):
    out, _ = trained
    state = load_checkpoint(out / "best.pt")
    files = sorted((multilabel_data / "val" / "images").glob("*.png"))[:6]
    proc = run_cli("predict", "--checkpoint", str(out / "best.pt"), *map(str, files), "--topk", "3", "--csv")
    rows = list(csv.DictReader(proc.stdout.splitlines()))
    assert len(rows) == 6
    for row in rows:
        probs = {row[f"class_{i}"]: float(row[f"prob_{i}"]) for i in range(1, 4)}
        expected = {c for i, c in enumerate(sorted(LABELS)) if probs[c] >= state["thresholds"][i]}
        assert set(filter(None, row["labels"].split(";"))) == expected


def test_multilabel_refuses_single_label_options(multilabel_data, tmp_path):
    from common.engine import train

    cli = {"data": str(multilabel_data), "output": str(tmp_path), "arch": "resnet18", "image_size": 32,
           "batch_size": 16, "workers": 0, "data_backend": "pytorch", "image_check": "none"}  # fmt: skip
    with pytest.raises(UserError, match="--positive-class is for single-label data"):
        train(config.resolve(config.TrainConfig, cli | {"positive_class": "red"}))
    with pytest.raises(UserError, match="--num-classes 5: multi-label data has 3 labels"):
        train(config.resolve(config.TrainConfig, cli | {"num_classes": 5}))


# ------------------------------------------------------------------------------------------------------------
# prepare csv --multi-label


def test_prepare_csv_multi_label_writes_labels_csv_splits_that_train_reads(tmp_path):
    from PIL import Image

    from common.owndata.dataset import prepare_own

    pytest.importorskip("imagehash")
    source = make_multilabel(tmp_path / "raw", n_train=60, n_val=0, seed=3) / "train"
    with open(source / "labels.csv") as f:
        given = {r["path"]: set(filter(None, r["labels"].split(";"))) for r in csv.DictReader(f)}
    # Exported as many tools do: one row per (image, label); an image without labels has a row of its own.
    rows = [("path", "label")] + [(p, label) for p, labels in given.items() for label in sorted(labels) or [""]]
    Image.open(source / "images" / "000.png").save(source / "images" / "000_copy.bmp")  # same pixels, other bytes
    rows += [("images/000_copy.bmp", label) for label in sorted(given["images/000.png"]) or [""]]
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    cli = {"dataset": "csv", "csv": str(tmp_path / "rows.csv"), "root": str(source), "out": str(tmp_path / "data"),
           "multi_label": True, "val_fraction": 0.3, "workers": 1}  # fmt: skip
    result = prepare_own(config.resolve(config.PrepareOwnConfig, cli))
    assert result.classes == sorted(LABELS)
    assert [len(d["removed"]) for d in result.duplicates] == [1]  # the copy in another format
    train, val = scan_split(tmp_path / "data" / "train"), scan_split(tmp_path / "data" / "val", LABELS)
    assert train.multilabel and val.multilabel and len(train) + len(val) == 60
    kept = {Path(p).name for p in train.files + val.files}
    assert len(kept & {"000.png", "000_copy.bmp"}) == 1
    for images in (train, val):  # every label in both splits, and each image's labels as the rows said
        assert all(n > 0 for n in images.class_counts())
        for path, row in zip(images.files, images.labels, strict=True):
            name = "images/" + Path(path).name.replace("000_copy.bmp", "000.png")
            assert {images.classes[i] for i in np.flatnonzero(row)} == given[name]
    assert sum(result.counts["train"].values()) == int(np.stack(train.labels).sum())


def test_prepare_single_label_csv_points_to_multi_label(tmp_path):
    from common.owndata.dataset import list_csv

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "rows.csv").write_text("path,label\na.png,red\na.png,blue\n")
    _, bad = list_csv(tmp_path / "rows.csv", tmp_path)
    assert "with another label (several labels per image: --multi-label)" in bad[f"{tmp_path / 'rows.csv'}:3"]
    items, bad = list_csv(tmp_path / "rows.csv", tmp_path, multi_label=True)
    assert not bad and [i.label for i in items] == ["blue;red"]


def test_learning_curve_on_multi_label_data_plots_map(multilabel_data, tmp_path, one_torch_thread):
    from common.learning_curve import run_learning_curve, stratified_subsets

    rows = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]])
    small, whole = stratified_subsets(rows, [0.1, 1.0], seed=0)
    # Strata by rarest label: {2}, {5} (green, blue: one image each), {4} (no label), the red rest. Each
    # stratum gives at least one image, so the rare labels are in the smallest subset.
    assert {2, 4, 5} <= set(small) and len(small) == 4 and list(whole) == list(range(8))

    cli = {"data": str(multilabel_data), "output": str(tmp_path), "arch": "resnet18", "image_size": 32,
           "batch_size": 16, "workers": 0, "data_backend": "pytorch", "epochs": 1, "max_steps_per_epoch": 2,
           "lr": 0.1, "warmup_epochs": 0.0, "image_check": "full", "fractions": "0.5,1.0"}  # fmt: skip
    result = run_learning_curve(config.resolve(config.LearningCurveConfig, cli))
    assert [r["train_images"] for r in result["rows"]][-1] == 96
    assert all("val.map" in r for r in result["rows"]) and "points of mAP" in result["verdict"]
    half = scan_split(tmp_path / "subsets" / "fraction_0.5" / "train")
    assert half.multilabel and len(half) == result["rows"][0]["train_images"]
    assert "val mAP (%)" in (tmp_path / "learning_curve.md").read_text()


def test_the_server_answers_a_sigmoid_per_label_and_publishes_the_thresholds(trained, multilabel_data):
    pytest.importorskip("httpx2", reason="fastapi's TestClient needs httpx2 (the serve extra)")
    from fastapi.testclient import TestClient

    from common.data import Normalizer, eval_transform, load_rgb
    from common.inference import load_trained
    from common.serving.app import create_app
    from common.serving.config import ServeConfig
    from tests.test_serve_similar import binary_request

    out, _ = trained
    cfg = ServeConfig(checkpoint=str(out / "best.pt"), device="cpu", workers=1).check()
    image = sorted((multilabel_data / "val" / "images").glob("*.png"))[0]
    local = load_trained(str(out / "best.pt"), torch.device("cpu"))
    with torch.no_grad():
        x = eval_transform(local.pipeline)(load_rgb(str(image)))
        expected = local.scores(local.model(Normalizer(torch.device("cpu"), False)(x[None])))[0].numpy()
    with TestClient(create_app(cfg)) as client:
        meta = client.get("/v2/models/resnet18").json()["parameters"]
        assert meta["multilabel"] is True
        assert meta["thresholds"] == pytest.approx(load_checkpoint(out / "best.pt")["thresholds"])
        body, headers = binary_request(image.read_bytes())
        answer = client.post("/v2/models/resnet18/infer", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
    probs = np.array(outputs["probabilities"]["data"], dtype=np.float32)
    assert probs == pytest.approx(expected, abs=1e-4)  # a sigmoid per label: they need not sum to 1
