"""Copy the facts of a finished training run into ``benchmarks/results/<device>/train_<name>.json``.

    python benchmarks/record_run.py RUN_DIR NAME --command "bash resnet50/train_1gpu.sh --profile quickstart" \
        --wall-seconds 512

Reads the run's ``config.json`` and DLLogger ``log.json``: per-epoch loss, top-1/top-5, epoch time and RSS,
the final top-1, and the command and whole wall time (set-up and start-up checks included) as measured outside;
and what else can change the figure: the training process's environment (threads, versions, the CPU's
instruction sets: ``environment.json``) and a checksum of the data it read.
A run trained with ``--target-top1`` / ``--target-map`` also records its time to accuracy (MLPerf's measure):
the target, the epoch that reached it and the training seconds to it (``common/target.py`` says what they count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
from pathlib import Path

import torch

from common.benchmark import device_name
from common.checkpoint import atomic_write_text
from common.logger import read_log

RESULTS = Path(__file__).resolve().parent / "results"


def data_checksum(root: Path) -> dict:
    """sha256 over every file of ``root``'s train/ and val/ (relative path and bytes, in sorted order)."""
    digest, files = hashlib.sha256(), 0
    for split in ("train", "val"):
        for path in sorted(p for p in (root / split).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
            files += 1
    return {"files": files, "sha256": digest.hexdigest()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("name")
    p.add_argument("--command", required=True, help="the command line that produced the run")
    p.add_argument("--wall-seconds", type=float, required=True, help="the command's whole wall time")
    args = p.parse_args()
    config = json.loads((args.run / "config.json").read_text())
    records = read_log(args.run / "log.json")
    epochs = [
        {"epoch": r["step"][0]} | {k: v for k, v in r["data"].items() if k.split(".")[-1] in
                                   ("loss", "top1", "top5", "epoch_time", "rss_mb", "total_ips")}
        for r in records if isinstance(r["step"], list) and len(r["step"]) == 1
    ]  # fmt: skip
    final = [r["data"] for r in records if r["step"] == [] and "val.top1" in r["data"]][-1]
    device = torch.device(config["device"])
    result = {
        "name": args.name,
        "command": args.command,
        "wall_seconds": args.wall_seconds,
        "train_seconds": sum(e["train.epoch_time"] for e in epochs),
        "final_top1": final["val.top1"],
        "final_top5": final["val.top5"],
        "best_top1": final["val.best_top1"],
        "arch": config["arch"],
        "width_mult": config.get("width_mult"),
        "image_size": config["image_size"],
        "epochs": config["epochs"],
        "batch_size": config["batch_size"],
        "data": config["data"],
        "data_backend": config["data_backend"],
        "device": device_name(device) if device.type == "cpu" else config["device"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "per_epoch": epochs,
    }
    if (args.run / "environment.json").exists():
        result["environment"] = json.loads((args.run / "environment.json").read_text())
    if Path(config["data"]).is_dir():
        result["data_checksum"] = data_checksum(Path(config["data"]))
    if "target.epoch" in final:
        metric = next(k.split(".", 1)[1] for k in final if k in ("target.top1", "target.map"))
        result["target"] = {"metric": metric, "value": final[f"target.{metric}"], "epoch": final["target.epoch"],
                            "seconds": final["target.seconds"]}  # fmt: skip
    out = RESULTS / ("cpu" if device.type == "cpu" else device_name(device).replace(" ", "-"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"train_{args.name}.json", json.dumps(result, indent=2))
    print(f"{out / f'train_{args.name}.json'}: top-1 {result['final_top1']:.2f}% in {args.wall_seconds:.0f} s")


if __name__ == "__main__":
    main()
