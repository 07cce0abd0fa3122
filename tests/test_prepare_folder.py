"""``convnets prepare folder|csv``: bad files named and left out, near duplicates never on both sides of a split,
stratified and grouped splits, hard links, and the report."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import config
from common.data import drop_bad_images, inspect_image
from common.errors import UserError
from common.owndata.dataset import prepare_own
from common.owndata.dedup import HASH_BITS, image_hash, near_pairs
from tests.conftest import run_cli, scan_splits

RADIUS = config.PrepareOwnConfig.dup_radius


def smooth_image(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A random picture (bicubic upscale of 16x16 colours) with detail at every frequency the perceptual hash
    reads, as photographs have: its resized and re-compressed copies stay within 4 of 256 bits, two such
    pictures 100+ apart. (A 6x6 upscale is too smooth: the hash's upper frequencies are then noise.)"""
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def make_raw(root: Path, seed: int = 0) -> dict:
    """A raw folder nobody prepared: skewed classes (30/14/3), resized and re-compressed copies (some across
    folders of one class), five frames of one video, and four bad files. Returns what was planted."""
    rng = np.random.default_rng(seed)
    planted = {"copies": [], "bad": [], "frames": [], "dali_only": []}
    for name, n in (("cat", 30), ("dog", 14), ("owl", 3)):
        (root / name / "sub").mkdir(parents=True)
        for i in range(n):
            image = smooth_image(rng)
            original = root / name / f"{i:03d}.png"
            image.save(original)
            if i % 5 == 1:  # a smaller copy, re-compressed as JPEG, in a sub-folder
                copy = root / name / "sub" / f"{i:03d}_small.jpg"
                image.resize((70, 70), Image.BILINEAR).save(copy, quality=75)
                planted["copies"].append((original, copy))
            if i % 7 == 2:  # an exact copy under another name
                copy = root / name / f"{i:03d}_again.png"
                image.save(copy)
                planted["copies"].append((original, copy))
    for k in range(5):  # frames of one video: one unit, however the split falls
        frame = root / "dog" / f"clipA_frame{k}.png"
        smooth_image(rng).save(frame)
        planted["frames"].append(frame)
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "text.png").write_text("not an image")
    data = (root / "dog" / "000.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "cat" / "notes.txt").write_text("ignored: not an image extension")
    planted["bad"] = [root / "cat" / "empty.jpg", root / "cat" / "text.png", root / "dog" / "truncated.png"]
    # A 32-bit integer TIFF: PIL reads it, DALI's decoder (the default backends') does not.
    Image.fromarray(np.arange(40 * 40, dtype=np.int32).reshape(40, 40) * 1000).save(root / "dog" / "scan.tif")
    planted["dali_only"] = [root / "dog" / "scan.tif"]
    return planted


def prepare(out: Path, workers: int = 1, **values):
    cfg = config.resolve(config.PrepareOwnConfig, {"out": str(out), "workers": workers, **values})
    return prepare_own(cfg)


def written(out: Path) -> dict[str, list[Path]]:
    return {s.name: sorted(p for p in s.rglob("*") if p.is_file()) for s in out.iterdir() if s.is_dir()}


def hamming(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("raw")
    return root, make_raw(root)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("prepared") / "data"
    result = prepare(out, workers=2, dataset="folder", src=str(raw[0]), val_fraction=0.25, test_fraction=0.15,
                     group_by=r"^(clip\w+)_frame\d+")  # fmt: skip
    return out, result


def test_bad_files_are_named_and_left_out(raw, prepared):
    out, result = prepared
    report = json.loads((out / "report.json").read_text())
    assert set(report["bad"]) - {str(p) for p in raw[1]["dali_only"]} == {str(p) for p in raw[1]["bad"]}
    assert "empty file" in report["bad"][str(raw[0] / "cat" / "empty.jpg")]
    names = {p.name for files in written(out).values() for p in files}
    assert not names & {"empty.jpg", "text.png", "truncated.png", "notes.txt"}
    md = (out / "report.md").read_text()
    assert all(str(p) in md for p in raw[1]["bad"])


def test_training_check_after_prepare_decodes_nothing(prepared, check_decodes, caplog, monkeypatch):
    out, result = prepared
    dali = importlib.util.find_spec("nvidia.dali") is not None

    with caplog.at_level(logging.INFO, logger="common.data.checks"):
        kept = drop_bad_images(scan_splits(out), "auto", skip_bad=False, workers=1, dali=dali)  # what `train` runs
    assert check_decodes == {"header": 0, "full": 0, "dali": 0}
    assert "image check: full (all" in caplog.text
    assert [len(k) for k in kept] == [sum(result.counts[s].values()) for s in ("train", "val")]
    drop_bad_images(scan_splits(out), "full", skip_bad=False, workers=1, dali=False)  # the pytorch backend's check
    monkeypatch.chdir(out.parent)  # `--data data`, a relative path: the same cache keys
    drop_bad_images(scan_splits(Path(out.name)), "full", skip_bad=False, workers=1, dali=dali)
    assert check_decodes == {"header": 0, "full": 0, "dali": 0}
    # The sizes training's DALI feeder draws crops from come from the cache: the displayed sizes, as a check reads.
    assert kept[0].sizes.tolist() == [list(inspect_image(f)[1:]) for f in kept[0].files]


def test_a_file_only_dali_refuses_is_named_and_left_out(raw, prepared):
    pytest.importorskip("nvidia.dali")
    out, result = prepared
    (tiff,) = raw[1]["dali_only"]
    assert inspect_image(str(tiff))[0] is None  # PIL reads it
    assert result.bad[str(tiff)].startswith("DALI cannot decode it")
    assert not [p for files in written(out).values() for p in files if p.name == tiff.name]
    assert str(tiff) in (out / "report.md").read_text()


def test_no_near_duplicate_straddles_the_split(raw, prepared):
    out, result = prepared
    removed = {r for d in result.duplicates for r in d["removed"]}
    for original, copy in raw[1]["copies"]:  # every planted copy was found: exactly one of the pair is kept
        assert (str(original) in removed) != (str(copy) in removed), (original, copy)
    # An independent check on what was written: no image in one split is within the radius of one in another.
    hashes = {s: [image_hash(Image.open(p)) for p in files if p.suffix != ".csv" and p.parent != out]
              for s, files in written(out).items()}  # fmt: skip
    splits = sorted(hashes)
    assert splits == ["test", "train", "val"]
    for a in splits:
        for b in splits:
            if a < b:
                assert min(hamming(x, y) for x in hashes[a] for y in hashes[b]) > RADIUS


def test_split_is_stratified_grouped_and_hard_linked(raw, prepared):
    out, result = prepared
    files = written(out)
    for split in ("train", "val", "test"):  # every class in every split where it has enough images
        assert {p.parent.name for p in files[split]} >= {"cat", "dog"}
    # owl has 3 images, one unit each: one per split, train first.
    assert [result.counts[s]["owl"] for s in ("train", "val", "test")] == [1, 1, 1]
    # ~25% / 15% of each class; cat keeps its 30 originals (its 10 copies are removed).
    assert sum(result.counts[s]["cat"] for s in result.counts) == 30
    assert 4 <= result.counts["val"]["cat"] <= 8 and 2 <= result.counts["test"]["cat"] <= 6
    frame_splits = {s for s, fs in files.items() for p in fs if p.name.startswith("clipA_frame")}
    assert len(frame_splits) == 1
    # On disk as check_decodes, and the same inode as the source (a hard link, not a copy).
    for split, per_class in result.counts.items():
        for label, n in per_class.items():
            assert len(list((out / split / label).rglob("*.*"))) == n
    rows = list(csv.DictReader(open(out / "splits.csv")))
    assert len(rows) == sum(sum(c.values()) for c in result.counts.values())
    assert os.stat(out / rows[0]["path"]).st_ino == os.stat(rows[0]["source"]).st_ino
    assert result.written == {"links": len(rows)}
    assert any("'owl' has only 3 images" in w for w in result.warnings)
    assert "| owl | 1 | 1 | 1 | 3 |" in (out / "report.md").read_text()
    assert (out / "split_counts.png").stat().st_size > 1000


def test_same_seed_same_split_and_a_non_empty_out_is_refused(raw, prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(UserError, match="is not empty"):
        prepare(out, dataset="folder", src=str(raw[0]))
    again = tmp_path / "again"
    prepare(again, dataset="folder", src=str(raw[0]), val_fraction=0.25, test_fraction=0.15,
            group_by=r"^(clip\w+)_frame\d+")  # fmt: skip
    assert (again / "splits.csv").read_text() == (out / "splits.csv").read_text()
    prepare(again, dataset="folder", src=str(raw[0]), seed=1, overwrite=True)
    assert not (again / "test").exists() and (again / "val").is_dir()


def test_csv_mode_reports_bad_rows_and_drops_an_image_labelled_twice(tmp_path):
    rng = np.random.default_rng(3)
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    rows = [("path", "label")]
    for i in range(12):
        smooth_image(rng).save(images / "a" / f"{i}.png")
        rows.append((f"a/{i}.png", "yes" if i % 2 else "no"))
    Image.open(images / "a" / "0.png").save(images / "a" / "0_copy.jpg", quality=90)
    rows += [("a/0_copy.jpg", "yes"), ("a/missing.png", "no"), ("a/1.png", "no"), ("a/2.png", "")]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = prepare(tmp_path / "data", dataset="csv", csv=str(tmp_path / "labels.csv"), root=str(images))
    assert result.bad[str(images / "a" / "missing.png")] == "no such file"
    assert "listed again" in result.bad[f"{tmp_path / 'labels.csv'}:16"]
    assert "expected 'path,label'" in result.bad[f"{tmp_path / 'labels.csv'}:17"]
    assert result.conflicts == [{"paths": [str(images / "a" / "0.png"), str(images / "a" / "0_copy.jpg")],
                                 "labels": ["no", "yes"]}]  # fmt: skip
    assert sum(sum(c.values()) for c in result.counts.values()) == 12 - 1
    assert (tmp_path / "data" / "train" / "yes" / "a" / "1.png").exists() or (
        tmp_path / "data" / "val" / "yes" / "a" / "1.png"
    ).exists()


def test_csv_rows_outside_the_root_stay_below_their_class_folder(tmp_path):
    # ../raw/rocket/1.png was written to train/rocket/../raw/rocket/1.png: a class "raw", the rocket folder empty.
    rng = np.random.default_rng(5)
    raw, root = tmp_path / "raw", tmp_path / "root"
    rows = [("path", "label")]
    for label in ("rocket", "coffee"):
        for folder in (raw / label, root / label):
            folder.mkdir(parents=True)
        for i in range(6):
            smooth_image(rng).save(raw / label / f"{i}.png")
            rows.append((f"../raw/{label}/{i}.png", label))
        smooth_image(rng).save(root / label / "0.png")  # the same name once the ".." is gone
        rows.append((f"raw/{label}/0.png", label))
        (root / "raw" / label).mkdir(parents=True)
        (root / label / "0.png").rename(root / "raw" / label / "0.png")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "data"
    result = prepare(out, dataset="csv", csv=str(tmp_path / "labels.csv"), root=str(root), val_fraction=0.3)
    files = [p for split in ("train", "val", "test") if (out / split).is_dir() for p in (out / split).rglob("*.png")]
    assert len(files) == 14 and all(p.resolve().is_relative_to(out.resolve()) for p in files)
    assert {p.relative_to(out).parts[1] for p in files} == {"rocket", "coffee"}  # <split>/<class>/...
    assert sum(sum(c.values()) for c in result.counts.values()) == 14
    assert {split: sorted(p.name for p in (out / split).iterdir()) for split in ("train", "val")} == {
        "train": ["coffee", "rocket"], "val": ["coffee", "rocket"]}  # fmt: skip


def test_out_and_source_may_not_hold_each_other(raw, tmp_path):
    # An --out inside the source became a class of the next prepare, which then dropped every image as a copy under
    # several classes; a source inside --out would be replaced by the tree with --overwrite.
    src = raw[0]
    with pytest.raises(UserError, match="must not be the source folder or inside it"):
        prepare(src / "prepared", dataset="folder", src=str(src))
    assert not (src / "prepared").exists()
    with pytest.raises(UserError, match="holds the source"):
        prepare(src.parent, dataset="folder", src=str(src), overwrite=True)
    assert src.is_dir() and any(src.iterdir())


def test_multi_index_search_finds_exactly_the_brute_force_pairs():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (1500, HASH_BITS // 8), dtype=np.uint8)
    for i in range(0, 300, 3):  # plant pairs at distances 0..14 around the radius
        codes[i + 1] = codes[i]
        for b in rng.choice(HASH_BITS, (i // 3) % 15, replace=False):
            codes[i + 1, b // 8] ^= 1 << (b % 8)
    words = codes.view(np.uint64)
    dist = np.bitwise_count(words[:, None, :] ^ words[None, :, :]).sum(-1)
    expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(dist <= RADIUS, 1)), strict=True)}
    found = near_pairs(codes, RADIUS)
    assert {(i, j) for i, j, _ in found} == expected
    assert all(dist[i, j] == d for i, j, d in found)
    assert len(expected) > 50


def test_the_command_line_prepares_a_folder(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        (tmp_path / "raw" / name).mkdir(parents=True)
        for i in range(4):
            smooth_image(rng).save(tmp_path / "raw" / name / f"{i}.png")
    out = tmp_path / "data"
    proc = run_cli("prepare", "folder", "--src", str(tmp_path / "raw"), "--out", str(out), "--val-fraction", "0.25")
    assert "report:" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (out / "val").iterdir()) == ["a", "b"]
    assert len(list((out / "train").rglob("*.png"))) == 6
