"""Does distillation help a small MobileNet? The same student trained alone and distilled from a stronger ResNet-18
of ours, on the same stratified subset of Fashion-MNIST, with the same schedule and the same seeds, several seeds
each.

    python benchmarks/distill_compare.py --data data/fashion-mnist [--train-images 6000] [--seeds 0 1 2 3 4]
        [--epochs 15] [--teacher-data full --teacher-epochs 2] [--arch mobilenet_v1 --width-mult 0.5] [--threads 1]

1. ``--train-images`` images of the training set, the same share of each class (``learning-curve``'s subsets:
   symbolic links, the image checks' verdicts shared), and the whole validation split (Fashion-MNIST's 10,000
   test images) to evaluate on;
2. the teacher: ResNet-18 with its Fashion-MNIST profile (``resnet50/preset.toml``), on the whole training set
   (``--teacher-data full``: the case distillation is for, a large model trained on all the data handing what it
   learned to a small one trained on less) or on the students' subset (``subset``; trained there for 15 epochs,
   it ended at 82.24%, below the student alone, and is no teacher);
3. for each seed, the student with the MobileNet ``fashion-mnist`` profile, alone and with ``--teacher``.

Every run is a ``convnets train`` process with ``--resume auto``, so the script continues where it was stopped and
reads finished runs back from their logs. Each run evaluates once, after its last epoch: the figure is the final
model's top-1, not the best of several evaluations. Top-1 per seed, the mean and sample standard deviation of each
arm, and the paired differences (distilled minus alone, seed by seed) with their mean, standard deviation and 95%
t-interval go to ``benchmarks/results/cpu/distill_<arch>_fashion_mnist.json`` with the commands and the machine.
Given the seeds and the thread count the accuracies do not depend on other load on the machine; the times do, and
are recorded only as what these runs took (``train_seconds``, the teacher's ``teacher_seconds_per_step``), not as
speed figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.environment import environment
from benchmarks.record_run import data_checksum
from common.checkpoint import atomic_write_text
from common.data import CheckCache, scan_split
from common.learning_curve import final_metrics, link_subset, share_verdicts, stratified_subsets
from common.logger import read_log

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Student's t, two-sided 95% (0.975 quantile), by degrees of freedom: n seeds give n - 1.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def make_subset(data: Path, images: int, seed: int, root: Path) -> int:
    """``root/train`` linking ``images`` training images (the same share of each class), ``root/val`` -> DATA/val,
    and the image checks' verdicts copied from DATA's cache; returns the number of training images linked."""
    train = scan_split(data / "train")
    (subset,) = stratified_subsets(train.labels, [images / len(train)], seed)
    links = link_subset(data, train, subset, root)
    share_verdicts(CheckCache(data), root, links)
    return len(subset)


def run(name: str, args: list[str], out: Path, threads: int) -> dict:
    """``convnets train ARGS --output out/NAME --resume auto``; its final validation metrics and its command."""
    output = out / name
    command = [sys.executable, "-m", "common", "train", *args, "--output", str(output), "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    print(f"{name}: convnets {' '.join(command[3:])}", flush=True)
    with open(out / f"{name}.out", "a") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    metrics = final_metrics(output / "log.json")
    epochs = [r["data"] for r in read_log(output / "log.json") if isinstance(r["step"], list) and len(r["step"]) == 1]
    print(f"{name}: top-1 {metrics['val.top1']:.2f}%", flush=True)
    found = {"name": name, "command": "convnets " + " ".join(command[3:]), "top1": metrics["val.top1"],
             "top5": metrics["val.top5"], "val_loss": metrics["val.loss"],
             "train_seconds": round(sum(e["train.epoch_time"] for e in epochs), 1)}  # fmt: skip
    if "train.teacher_time" in epochs[-1]:
        found["teacher_seconds_per_step"] = round(statistics.fmean(e["train.teacher_time"] for e in epochs), 4)
    return found


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, and the 95% t-interval of the mean (n >= 2)."""
    mean, std = statistics.fmean(values), statistics.stdev(values)
    half = T_975.get(len(values) - 1, 1.96) * std / len(values) ** 0.5
    return {"n": len(values), "mean": round(mean, 3), "std": round(std, 3),
            "ci95": [round(mean - half, 3), round(mean + half, 3)]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "fashion-mnist")
    p.add_argument("--train-images", type=int, default=6000, help="training images of the subset (default: 6000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="student seeds (default: 0-4)")
    p.add_argument("--epochs", type=int, default=15, help="student epochs (default: 15)")
    p.add_argument(
        "--teacher-data",
        choices=("full", "subset"),
        default="full",
        help="the teacher's training set: DATA's whole train/ or the students' subset (default: full)",
    )
    p.add_argument("--teacher-epochs", type=int, default=2, help="teacher epochs (default: 2)")
    p.add_argument("--arch", default="mobilenet_v1", help="the student (default: mobilenet_v1)")
    p.add_argument("--width-mult", type=float, default=0.5, help="the student's width (default: 0.5)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every run (default: 1)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "distill-compare")
    p.add_argument("--json", type=Path, default=None, help="default: results/cpu/distill_<arch>_fashion_mnist.json")
    args = p.parse_args()
    if len(args.seeds) < 2:
        p.error("give at least two --seeds: a spread needs them")
    args.out.mkdir(parents=True, exist_ok=True)
    subset = args.out / "subset"
    linked = make_subset(args.data, args.train_images, 0, subset)
    data = ["--data", str(subset)]
    once = lambda epochs: ["--epochs", str(epochs), "--eval-every", str(epochs)]  # noqa: E731 - evaluate at the end

    teacher_name = f"teacher_{args.teacher_data}"
    teacher_data = ["--data", str(args.data)] if args.teacher_data == "full" else data
    teacher = run(teacher_name, ["--preset", "resnet50/preset.toml", "--profile", "fashion-mnist", *teacher_data,
                                 *once(args.teacher_epochs)], args.out, args.threads)  # fmt: skip
    teacher["train_images"] = len(scan_split(args.data / "train")) if args.teacher_data == "full" else linked
    student = ["--preset", "mobilenet/preset.toml", "--profile", "fashion-mnist", *data, "--arch", args.arch,
               "--width-mult", f"{args.width_mult:g}", *once(args.epochs)]  # fmt: skip
    runs: dict[str, list[dict]] = {"alone": [], "distilled": []}
    for seed in args.seeds:
        runs["alone"].append(run(f"alone_seed{seed}", [*student, "--seed", str(seed)], args.out, args.threads))
        runs["distilled"].append(run(f"distilled_seed{seed}", [*student, "--seed", str(seed), "--teacher",
                                     str(args.out / teacher_name / "best.pt")], args.out, args.threads))  # fmt: skip
    alone = [r["top1"] for r in runs["alone"]]
    distilled = [r["top1"] for r in runs["distilled"]]
    differences = [round(d - a, 3) for a, d in zip(alone, distilled, strict=True)]
    config = json.loads((args.out / f"distilled_seed{args.seeds[0]}" / "config.json").read_text())
    result = {
        "name": f"distill_{args.arch}_fashion_mnist",
        "command": "python benchmarks/distill_compare.py " + " ".join(sys.argv[1:]),
        "what": f"{args.arch} x{args.width_mult:g} trained alone and distilled from a resnet18 teacher, same subset, "
        "schedule and seeds; top-1 of the final model on the whole validation split",
        "train_images": linked,
        "val_images": len(scan_split(args.data / "val")),
        "image_size": config["image_size"],
        "epochs": args.epochs,
        "seeds": args.seeds,
        "distill_alpha": config["distill_alpha"],
        "distill_temperature": config["distill_temperature"],
        "teacher": teacher,
        "notes": (
            "A first teacher, resnet18 with its fashion-mnist profile trained on the students' 6,000-image subset for "
            "15 epochs (--teacher-data subset --teacher-epochs 15), ended at 82.24% top-1, below the student alone "
            "(82.89%, seed 0): no stronger teacher, so that run was stopped and the teacher trained on the whole "
            "training set instead."
        ),
        "runs": runs,
        "summary": {
            "alone_top1": spread(alone),
            "distilled_top1": spread(distilled),
            "difference_per_seed": differences,
            "difference": spread(differences),
        },
        "threads_per_run": args.threads,
        "environment": environment(torch.device("cpu")),
        "data_checksum": data_checksum(args.data),
    }
    path = args.json or RESULTS / "cpu" / f"distill_{args.arch}_fashion_mnist.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    print(f"alone {s['alone_top1']['mean']:.2f} +- {s['alone_top1']['std']:.2f}, distilled "
          f"{s['distilled_top1']['mean']:.2f} +- {s['distilled_top1']['std']:.2f}, difference "
          f"{s['difference']['mean']:+.2f} +- {s['difference']['std']:.2f} (95% CI {s['difference']['ci95']}); "
          f"wrote {path}")  # fmt: skip


if __name__ == "__main__":
    main()
