"""End-to-end: train, evaluate and predict through the CLI on generated images, and the errors users meet.

Training and the launchers run as a user's shell runs them (a subprocess each); commands that only read and the
errors run in this process through the ``cli`` fixture, which gives the same exit code and output without the
seconds of start-up (``test_missing_val_folder`` keeps one error path in a real process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from common.logger import read_log
from tests.conftest import FAST_TRAIN, ONE_THREAD, ROOT, run_cli


@pytest.fixture(scope="module", params=["dali-cpu", "pytorch"])
def trained(request, image_tree, tmp_path_factory):
    """A short training run on each CPU backend: (backend, output folder, stdout)."""
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    proc = run_cli("train", "--data", str(image_tree), "--data-backend", request.param, "--epochs", "3",
                   "--output", str(out), *FAST_TRAIN)  # fmt: skip
    return request.param, out, proc.stdout


def test_training_beats_chance(trained):
    backend, out, stdout = trained
    records = read_log(out / "log.json")
    final = [r for r in records if r["step"] == [] and "val.top1" in r["data"]]
    assert final, stdout
    # 4 classes: chance is 25%.
    assert final[-1]["data"]["val.top1"] >= 70.0, f"{backend}: {final[-1]['data']}"
    config = json.loads((out / "config.json").read_text())
    assert config["data_backend"] == backend and config["num_classes"] == 4
    epochs = [r for r in records if len(r["step"]) == 1]
    assert [r["step"][0] for r in epochs] == [0, 1, 2]
    assert all("train.rss_mb" in r["data"] and "val.top5" in r["data"] for r in epochs)
    assert {p.name for p in out.iterdir()} >= {"best.pt", "checkpoint_epoch_0002.pt", "log.json", "config.json"}
    # What else changes the numbers, as the process saw it (run_cli starts it with one intra-op thread).
    environment = json.loads((out / "environment.json").read_text())
    assert environment["torch_threads"] == 1 and environment["thread_variables"]["OMP_NUM_THREADS"] == "1"
    assert environment["versions"]["torch"] == torch.__version__.split("+")[0]
    assert [r["data"]["environment"] for r in records if "environment" in r["data"]] == [environment]


def test_evaluate_json_and_confusion_matrix(trained, image_tree, tmp_path, cli):
    backend, out, _ = trained
    proc = cli("evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(image_tree),
                   "--data-backend", backend, "--output", str(tmp_path), "--json")  # fmt: skip
    result = json.loads(proc.stdout)  # stdout holds exactly one JSON object
    assert result["images"] == 64
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert set(result["per_class"]) == {"blue", "green", "red", "yellow"}
    best = max(r["data"]["val.top1"] for r in read_log(out / "log.json") if "val.top1" in r["data"])
    assert result["top1"] == pytest.approx(best, abs=1e-6)  # same images, same model: same number
    png = tmp_path / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_files_folders_globs_and_bad_files(trained, image_tree, tmp_path, cli):
    _, out, _ = trained
    for name in ("red", "blue"):
        shutil.copytree(image_tree / "val" / name, tmp_path / "imgs" / "nested" / name)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    proc = cli("predict", "--checkpoint", str(out / "best.pt"), str(tmp_path / "imgs"),
                   str(image_tree / "val" / "green" / "00*.png"), "--topk", "2", "--batch-size", "5",
                   check=False)  # fmt: skip
    assert proc.returncode == 1  # some files failed, the rest were classified
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    errors = {Path(r["path"]).name: r["error"] for r in lines if "error" in r}
    assert set(errors) == {"broken.jpg", "empty.png"}
    good = [r for r in lines if "top" in r]
    assert len(good) == 16 + 16 + len(list((image_tree / "val" / "green").glob("00*.png")))
    assert all(len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"] for r in good)
    reds = [r for r in good if "/red/" in r["path"]]
    assert sum(r["top"][0]["class"] == "red" for r in reds) >= len(reds) * 0.6
    csv_proc = cli("predict", "--checkpoint", str(out / "best.pt"), str(tmp_path / "imgs" / "nested" / "red"),
                   "--csv", "--topk", "1")  # fmt: skip
    rows = csv_proc.stdout.strip().splitlines()
    assert rows[0] == "path,class_1,prob_1,error" and len(rows) == 17


def test_info_resnet50_counts(cli):
    result = json.loads(cli("info", "--arch", "resnet50", "--json").stdout)
    assert round(result["params"] / 1e6, 1) == 25.6
    assert round(result["macs"] / 1e9, 1) == 4.1


def test_info_list_covers_registry(cli):
    from common.registry import list_models

    out = cli("info", "--list").stdout
    for name in list_models():
        assert f"\n{name} " in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "resnet5"], "unknown --arch 'resnet5'. Did you mean: resnet50"),
        (["--arch", "resnet50", "--width-mult", "0.5"], "resnet50 has no width multiplier"),
        (["--batch-size", "0"], None),
    ],
)
def test_bad_arguments_get_clear_messages(image_tree, tmp_path, args, message, cli):
    proc = cli("train", "--data", str(image_tree), "--output", str(tmp_path), "--epochs", "1",
                   *FAST_TRAIN, *args, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    if message:
        assert message in proc.stderr


def test_a_batch_of_one_stops_in_its_first_step_with_a_clear_message(image_tree, tmp_path):
    """An error raised inside a training step (BatchNorm's), in a real process: exit 2, one line, no traceback."""
    proc = run_cli("train", "--data", str(image_tree), "--output", str(tmp_path), "--epochs", "1", *FAST_TRAIN,
                   "--batch-size", "1", "--max-steps-per-epoch", "1", check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "use --batch-size 2 or more" in proc.stderr


def test_missing_val_folder(fresh_tree, tmp_path, cli):
    shutil.rmtree(fresh_tree / "val")
    proc = cli("train", "--data", str(fresh_tree), "--output", str(tmp_path), *FAST_TRAIN, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{fresh_tree} has no val/ folder" in proc.stderr


def test_empty_class_folder(fresh_tree, tmp_path, cli):
    for f in (fresh_tree / "train" / "green").iterdir():
        f.unlink()
    proc = cli("train", "--data", str(fresh_tree), "--output", str(tmp_path), *FAST_TRAIN, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "class folders with no images" in proc.stderr and str(fresh_tree / "train" / "green") in proc.stderr


@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
def test_corrupt_images_stop_or_are_skipped(fresh_tree, tmp_path, backend, cli):
    good = fresh_tree / "train" / "red" / "000.png"
    truncated = fresh_tree / "train" / "red" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (fresh_tree / "train" / "blue" / "zero.jpg").write_bytes(b"")
    (fresh_tree / "val" / "green" / "text.png").write_text("this is not an image")
    args = ["train", "--data", str(fresh_tree), "--data-backend", backend, "--epochs", "1", *FAST_TRAIN]
    proc = run_cli(*args, "--output", str(tmp_path / "a"), check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for name in ("truncated.png", "zero.jpg"):
        assert name in proc.stderr
    # One report for both splits, so that a tree is fixed in one round (one step shows it: the epoch is not the
    # point here).
    proc = run_cli(*args, "--output", str(tmp_path / "b"), "--skip-bad-images", "--max-steps-per-epoch", "1",
                   timeout=300)  # fmt: skip
    assert "leaving out 3 file(s)" in proc.stdout and "text.png" in proc.stdout
    # `prepare --check` lists all three and exits 1.
    check = cli("prepare", "--check", str(fresh_tree), check=False)
    assert check.returncode == 1
    assert all(name in check.stdout for name in ("truncated.png", "zero.jpg", "text.png"))


def test_corrupt_checkpoint_is_named(tmp_path, image_tree, cli):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    proc = cli("evaluate", "--checkpoint", str(bad), "--data", str(image_tree), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"checkpoint {bad} cannot be read" in proc.stderr


# The launcher, not the model, is under test: VGG's launcher trains a MobileNet, because building VGG-11's
# 130M parameters and writing two 0.5 GB checkpoints took most of this test's time (every VGG runs forward and
# backward in test_models.py).
@pytest.mark.parametrize(
    ("recipe", "arch", "from_preset"),
    [
        ("resnet50", "resnet18", {"momentum": 0.875, "weight_decay": 3.0517578125e-05,
                                  "memory_format": "channels_last"}),
        ("mobilenet", "mobilenet_v1", {"depthwise_weight_decay": False, "momentum": 0.9}),
        ("vgg", "mobilenet_v3_small", {"label_smoothing": 0.0, "lr_schedule": "step"}),
    ],
)  # fmt: skip
def test_every_recipe_launcher_passes_arguments_through(recipe, arch, from_preset, image_tree, tmp_path):
    """`bash RECIPE/train_1gpu.sh --epochs 1 --data-backend pytorch ...` overrides the preset, which overrides
    the engine's defaults."""
    proc = subprocess.run(
        ["bash", str(ROOT / recipe / "train_1gpu.sh"), "--data", str(image_tree), "--arch", arch, "--epochs", "1",
         "--data-backend", "pytorch", "--batch-size", "8", "--image-size", "32", "--max-steps-per-epoch", "1",
         "--workers", "1", "--output", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, **ONE_THREAD},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["arch"], config["epochs"], config["batch_size"]) == (arch, 1, 8)
    assert config["data_backend"] == "pytorch"
    assert {k: config[k] for k in from_preset} == from_preset


def test_vgg_scripts_show_the_note_and_its_numbers_hold():
    """The launchers print vgg/NOTE above --help, and every count the note quotes is what the flop counter
    measures (a note that goes stale when a model changes fails here)."""
    import re

    import torch

    from common.info import count_model
    from common.registry import create_model

    note = (ROOT / "vgg" / "NOTE").read_text()
    for script in ("train_1gpu.sh", "benchmark.sh"):
        proc = subprocess.run(["bash", str(ROOT / "vgg" / script), "--help"], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert note.strip()[:60] in proc.stdout and "--batch-size" in proc.stdout
    vgg16, vgg19, resnet50 = (count_model(a, 224, 1000, None) for a in ("vgg16", "vgg19", "resnet50"))
    quoted = re.search(r"VGG-16: ([\d.]+)M parameters \(([\d.]+)M of them in the first FC layer\), ([\d.]+) G", note)
    params, fc1, macs = map(float, quoted.groups())
    with torch.device("meta"):
        first_fc = sum(p.numel() for p in create_model("vgg16").classifier[0].parameters())
    assert params == round(vgg16.params / 1e6, 1) and fc1 == round(first_fc / 1e6, 1)
    assert macs == round(vgg16.macs / 1e9, 1)
    assert f"about {vgg16.macs / resnet50.macs:.1f}x ResNet-50's {resnet50.macs / 1e9:.1f} G" in note
    assert (
        f"VGG-19: {vgg19.params / 1e6:.1f}M parameters, {vgg19.macs / 1e9:.1f} G ({vgg19.macs / resnet50.macs:.1f}x)"
        in note
    )
    assert f"{vgg16.params * 4 / 1e6:.0f} MB of fp32" in note


@pytest.mark.parametrize(
    "command",
    [
        ["info", "--arch", "vgg16", "--width-mult", "0.5"],
        ["benchmark", "--arch", "resnet50", "--width-mult", "0.5", "--iterations", "1", "--warmup", "0"],
        ["train", "--arch", "mobilenet_v3_small", "--width-mult", "0.75"],
    ],
)
def test_width_mult_is_refused_for_models_without_one(command, image_tree, cli):
    if command[0] == "train":
        command = [*command, "--data", str(image_tree)]
    proc = cli(*command, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has no width multiplier" in proc.stderr


def test_width_mult_reaches_info_and_the_checkpoint(image_tree, tmp_path, cli):
    half = json.loads(cli("info", "--arch", "mobilenet_v1", "--width-mult", "0.5", "--json").stdout)
    assert round(half["macs"] / 1e6) == 149 and round(half["params"] / 1e6, 1) == 1.3
    run_cli("train", "--data", str(image_tree), "--arch", "mobilenet_v1", "--width-mult", "0.25", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--batch-size", "8", "--image-size", "32",
            "--output", str(tmp_path))  # fmt: skip
    from common.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "best.pt")["config"]["width_mult"] == 0.25
    proc = cli("evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--data", str(image_tree), "--json")
    assert json.loads(proc.stdout)["images"] == 64
    wrong = cli("evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--data", str(image_tree),
                "--width-mult", "0.5", check=False)  # fmt: skip
    assert wrong.returncode == 2 and "differs from the checkpoint's (0.25)" in wrong.stderr


def test_compile_changes_speed_not_results(image_tree, tmp_path):
    """--compile (torch.compile, inductor) trains the same model as eager mode, up to float noise.

    The first step's loss is a forward pass of identical weights on identical images: it must agree closely.
    Later steps drift apart by rounding (inductor fuses and reorders float sums, and BatchNorm in training mode
    amplifies it), so after three updates only a looser agreement is expected."""
    args = ["train", "--data", str(image_tree), "--data-backend", "pytorch", "--epochs", "1", "--deterministic",
            "--max-steps-per-epoch", "3", *FAST_TRAIN, "--lr", "0.05"]  # fmt: skip
    steps, epochs = {}, {}
    for name, flag in (("eager", "--no-compile"), ("compiled", "--compile")):
        run_cli(*args, flag, "--output", str(tmp_path / name))
        records = read_log(tmp_path / name / "log.json")
        steps[name] = [r["data"]["train.loss"] for r in records if len(r["step"]) == 2]
        epochs[name] = [r["data"] for r in records if len(r["step"]) == 1][-1]
    assert len(steps["eager"]) == len(steps["compiled"]) == 3
    assert steps["compiled"][0] == pytest.approx(steps["eager"][0], rel=1e-4)
    assert steps["compiled"] == pytest.approx(steps["eager"], rel=0.03)
    assert epochs["compiled"]["val.loss"] == pytest.approx(epochs["eager"]["val.loss"], rel=0.03)


def test_a_model_with_more_outputs_than_classes_evaluates_and_predicts(image_tree, tmp_path, cli):
    """--num-classes above the folder count (room for classes to come): the unnamed outputs are never reported."""
    run_cli("train", "--data", str(image_tree), "--data-backend", "pytorch", "--epochs", "1", "--num-classes", "6",
            "--max-steps-per-epoch", "2", "--output", str(tmp_path / "run"), *FAST_TRAIN)  # fmt: skip
    checkpoint = str(tmp_path / "run" / "best.pt")
    proc = cli("evaluate", "--checkpoint", checkpoint, "--data", str(image_tree), "--data-backend", "pytorch",
               "--json")  # fmt: skip
    result = json.loads(proc.stdout)
    assert result["images"] == 64 and set(result["per_class"]) <= {"blue", "green", "red", "yellow"}
    proc = cli("predict", "--checkpoint", checkpoint, "--topk", "5", str(image_tree / "val" / "red"))
    for line in proc.stdout.splitlines():
        top = json.loads(line)["top"]
        assert len(top) == 4 and abs(sum(t["prob"] for t in top) - 1) < 1e-4
