"""``convnets predict --organize``: one folder per predicted class, doubtful images to uncertain/, bad files
recorded, and a run killed with SIGKILL that a restart finishes without processing any file twice or losing one."""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import config
from common.errors import UserError
from common.owndata.organize import COLUMNS, SORTED_BY, part_files, read_decisions, run_organize
from tests.conftest import ROOT

CLASSES = ["bird", "cat", "dog"]


def write_tiny_checkpoint(path: Path, arch: str = "resnet18") -> Path:
    """A checkpoint with the entries load_trained reads (untrained weights: the decisions are arbitrary but fixed)."""
    from common.builders import build_model
    from common.registry import get_model_spec

    torch.manual_seed(0)
    spec = get_model_spec(arch)
    model = build_model(spec, len(CLASSES))
    with torch.no_grad():  # a head far from uniform, so that confidences spread out
        model.get_submodule(spec.head).weight.normal_(0, 0.2)
    cfg = {"arch": arch, "num_classes": len(CLASSES), "width_mult": None, "image_size": 32, "val_resize": 36,
           "memory_format": "contiguous", "freeze_backbone": False}  # fmt: skip
    torch.save({"model": model.state_dict(), "config": cfg, "class_names": CLASSES}, path)
    return path


def make_collection(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = root / f"day{i % 3}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
        files.append(path)
    for name in ("broken.png", "empty.jpg"):
        (root / "day0" / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage" if name == "broken.png" else b"")
        files.append(root / "day0" / name)
    return files


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("organize")
    return write_tiny_checkpoint(root / "tiny.pt"), root / "collection", make_collection(root / "collection", 300)


def organize(checkpoint, collection, out, **values) -> int:
    cli = {"checkpoint": str(checkpoint), "paths": [str(collection)], "organize": str(out), "device": "cpu",
           "batch_size": 16, "workers": 0, **values}  # fmt: skip
    return run_organize(config.resolve(config.OrganizeConfig, cli))


def placed_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and p.name not in ("decisions.csv", SORTED_BY)]


def test_decisions_folders_and_min_confidence(setup, tmp_path):
    checkpoint, collection, files = setup
    assert organize(checkpoint, collection, tmp_path / "all", chunk_size=100) == 1  # two bad files
    rows = read_decisions(tmp_path / "all" / "decisions.csv")
    assert set(rows) == {str(f) for f in files}
    bad = {p for p, r in rows.items() if r["status"] == "bad"}
    assert bad == {str(collection / "day0" / "broken.png"), str(collection / "day0" / "empty.jpg")}
    assert all(rows[p]["error"].startswith("cannot decode") for p in bad)
    median = float(np.median([float(r["confidence"]) for r in rows.values() if r["status"] != "bad"]))
    out = tmp_path / "doubt"
    organize(checkpoint, collection, out, min_confidence=median)
    rows = read_decisions(out / "decisions.csv")
    uncertain = [r for r in rows.values() if r["status"] == "uncertain"]
    assert 0 < len(uncertain) < len(files) - 2
    for path, row in rows.items():
        if row["status"] == "bad":
            continue
        assert (row["status"] == "sorted") == (float(row["confidence"]) >= median)
        folder = row["class"] if row["status"] == "sorted" else f"uncertain/{row['class']}"
        assert row["destination"] == f"{folder}/{os.path.relpath(path, collection)}"
        assert os.path.samefile(out / row["destination"], path)  # a hard link
    assert len(placed_files(out)) == len(files) - 2


def test_a_folder_another_checkpoint_or_threshold_sorted_is_not_continued(setup, tmp_path):
    # A rerun with another checkpoint used to say "0 to go" and keep the first model's folders, silently.
    checkpoint, collection, files = setup
    out = tmp_path / "sorted"
    organize(checkpoint, collection, out, min_confidence=0.3)
    before = (out / "decisions.csv").read_text()
    state = torch.load(checkpoint, weights_only=True)
    next(iter(state["model"].values())).add_(1)
    torch.save(state, tmp_path / "retrained.pt")
    with pytest.raises(UserError, match=f"sorted by {checkpoint} with --min-confidence 0.3 .*retrained.pt"):
        organize(tmp_path / "retrained.pt", collection, out, min_confidence=0.3)
    with pytest.raises(UserError, match="this run has .* with --min-confidence 0.5"):
        organize(checkpoint, collection, out, min_confidence=0.5)
    (tmp_path / "same.pt").write_bytes(checkpoint.read_bytes())  # the same weights under another name: continues
    assert organize(tmp_path / "same.pt", collection, out, min_confidence=0.3) == 0
    assert (out / "decisions.csv").read_text() == before


def test_a_killed_run_restarts_where_it_stopped(setup, tmp_path, caplog):
    checkpoint, collection, files = setup
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(checkpoint), "--organize", str(out), str(collection), "--device", "cpu",
            "--batch-size", "8", "--chunk-size", "8", "--workers", "0"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "common", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    decisions = out / "decisions.csv"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if decisions.exists() and decisions.read_text().count("\n") > 9:  # the header and at least a chunk
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = read_decisions(decisions)
    assert 8 <= len(first) < len(files), "the run was not interrupted mid-way"
    with caplog.at_level(logging.INFO, logger="convnets"):
        assert organize(checkpoint, collection, out, batch_size=8, chunk_size=8) == 1  # the two bad files
    assert f"{len(first)} sorted by an earlier run" in caplog.text
    with open(decisions, newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert sorted(paths) == sorted(str(f) for f in files)  # each file exactly once: none twice, none lost
    rows = read_decisions(decisions)
    assert all(rows[p] == r for p, r in first.items())  # the earlier rows are kept as they were
    assert len(placed_files(out)) == len(files) - 2  # no stray temporary or doubled file
    # The same decisions as a run that was never interrupted.
    organize(checkpoint, collection, tmp_path / "straight")
    straight = read_decisions(tmp_path / "straight" / "decisions.csv")
    assert {p: r["class"] for p, r in rows.items()} == {p: r["class"] for p, r in straight.items()}


def test_a_torn_last_line_is_cut_off(tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_text("path,class,confidence,status,destination,error\n/a.png,cat,0.9,sorted,cat/a.png,\n/b.png,d")
    assert list(read_decisions(path)) == ["/a.png"]
    assert path.read_text().endswith("cat/a.png,\n")


def test_two_ranks_under_torchrun_share_the_work_and_leave_one_csv(setup, tmp_path):
    checkpoint, collection, files = setup
    out = tmp_path / "ddp"
    # A run interrupted under torchrun left a rank file behind: its rows count as decided and are merged.
    out.mkdir()
    (out / "decisions.rank1.csv").write_text(",".join(COLUMNS) + f"\n{files[0]},cat,0.5,sorted,x,\n{files[1]},d")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "common",
         "predict", "--checkpoint", str(checkpoint), "--organize", str(out), str(collection), "--device", "cpu",
         "--workers", "0", "--batch-size", "16", "--chunk-size", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    # Every file in exactly one rank's share: the rank files held one row per file, none twice.
    assert f"merged {len(files)} decisions of the ranks" in proc.stderr, proc.stderr[-3000:]
    assert part_files(out) == []
    with open(out / "decisions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(str(f) for f in files)  # each file once, across both ranks
    assert next(r for r in rows if r["path"] == str(files[0]))["destination"] == "x"  # the earlier row, kept
    assert len(placed_files(out)) == len(files) - 3  # the earlier run placed files[0]; two files are bad
