"""DALI for the GPU machine, which has no network and takes at most 64 MiB a call, working tree included.

The wheels DALI needs there weigh about 262 MB (DALI's own 199 MB: its operator library alone is 243 MB
unpacked), so they travel as one xz archive of the unpacked, stripped packages, cut into parts of
``--part-mib`` that one call each carries. Stripped are only things that cannot be loaded on that machine or
for these decoders: the extension modules of the other Python versions, C headers, and nvImageCodec's codecs
for JPEG 2000, TIFF and OpenCV (JPEG decodes through its libjpeg-turbo and nvJPEG extensions). Every shared
library in DALI's ``.libs`` is kept: the others link to them by their hashed names (``readelf -d``), so none
can be left out. nvCOMP (28.5 MB) is left out too: DALI opens it only for its decompression operators.

Here (builds the parts; ``check`` proves a stripped archive by running DALI's CPU pipeline from it)::

    python -m benchmarks.dali_bundle build [--python 312] [--cache DIR] [--into .whl]
    python -m benchmarks.dali_bundle check --python 311 --interpreter /path/to/python-without-dali

There, one call per part, the last one unpacking (stdlib only)::

    python3 -m benchmarks.dali_bundle stash        # copies the carried .whl/dali-K/ to /tmp/dali-parts
    python3 -m benchmarks.dali_bundle assemble     # all parts there: checks, unpacks to /tmp/site
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# DALI's pin is the repository's (constraints.txt); its needs are pinned to what its Requires-Dist allows and
# the CPU machines install. numpy, six and packaging are on the GPU machine already (KINDS.md).
NEEDS = {
    "nvidia-nvimgcodec-cu13": "0.9.0.20",
    "nvidia-nvjpeg": "13.3.2.43",
    "astunparse": "1.6.3",
    "gast": "0.7.0",
    "optree": "0.20.0",
    "nvtx": "0.2.17",
    "makefun": "1.16.0",
    "libcst": "1.9.0",
}
LEFT_OUT = {"nvidia-libnvcomp-cu13": "dlopened only by DALI's decompression operators (experimental.inflate)"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip
STRIP = (
    "nvidia/dali/include/*",
    "nvidia/nvimgcodec/include/*",
    "nvidia/cu13/include/*",
    "nvidia/nvimgcodec/extensions/libnvjpeg2k_ext*",
    "nvidia/nvimgcodec/extensions/libnvtiff_ext*",
    "nvidia/nvimgcodec/extensions/libtiff_ext*",
    "nvidia/nvimgcodec/extensions/libopencv_ext*",
)
# Compiled once per CPython version in these py3-none wheels: all but the target's are dead weight.
PER_PYTHON = re.compile(r"\.cpython-(\d+t?)-x86_64-linux-gnu\.so$")
PARTS = Path("/tmp/dali-parts")  # on the GPU machine: survives between calls while the machine stays warm
SITE = Path("/tmp/site")


def dali_version() -> str:
    text = (ROOT / "constraints.txt").read_text()
    return re.search(r"^nvidia-dali-cuda130==(\S+)", text, re.M).group(1)


def download(cache: Path, python: str) -> list[Path]:
    """The wheels, fetched once into ``cache`` by pip for the GPU machine's CPython and platform."""
    wanted = {"nvidia-dali-cuda130": dali_version(), **NEEDS}
    cache.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pins = [f"{name}=={version}" for name, version in wanted.items()]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *platforms, "-d", str(cache), *pins],
                   check=True)  # fmt: skip
    found = []
    for name, version in wanted.items():
        stem = re.sub(r"[-.]", "_", name)
        matches = [p for p in cache.glob(f"{stem}-{version}-*.whl") if _fits(p.name, python)]
        if len(matches) != 1:
            raise SystemExit(f"expected one wheel of {name}=={version} for cp{python} in {cache}, found {matches}")
        found.append(matches[0])
    return found


def _fits(wheel: str, python: str) -> bool:
    return "-py3-none-" in wheel or "-py2.py3-none-" in wheel or f"-cp{python}-" in wheel


def _stripped(rel: str, python: str) -> bool:
    if any(fnmatch.fnmatch(rel, pattern) for pattern in STRIP):
        return True
    m = PER_PYTHON.search(rel)
    return bool(m) and m.group(1) != python


def unpack(wheels: list[Path], site: Path, python: str) -> dict:
    """Unzip the wheels into ``site`` as ``pip install --target`` lays them out (every one of these is a plain
    package plus its dist-info), leaving out what ``_stripped`` names; sizes before and after."""
    sizes = {"wheels_bytes": {}, "unpacked_bytes": 0, "stripped_bytes": 0}
    for wheel in wheels:
        sizes["wheels_bytes"][wheel.name] = wheel.stat().st_size
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                sizes["unpacked_bytes"] += info.file_size
                if _stripped(info.filename, python):
                    sizes["stripped_bytes"] += info.file_size
                    continue
                target = site / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                mode = info.external_attr >> 16
                if mode:
                    target.chmod(mode & 0o777 | 0o600)
    sizes["kept_bytes"] = sizes["unpacked_bytes"] - sizes["stripped_bytes"]
    return sizes


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No times or owners in the archive: the same wheels give the same bytes, and the same sha256."""
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def archive(site: Path, path: Path, preset: int) -> None:
    """``site`` as one tar.xz: one stream compresses the many shared libraries' common parts together."""
    with lzma.open(path, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for file in sorted(site.rglob("*")):
            tar.add(file, arcname=str(file.relative_to(site)), recursive=False, filter=_normalised)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:  # file_digest: Python 3.11+ (3.11 here, 3.12 on the GPU machine)
        return hashlib.file_digest(f, "sha256").hexdigest()


def split(path: Path, into: Path, part_mib: float, manifest: dict) -> list[Path]:
    """Cut ``path`` into ``into/dali-K/part`` of at most ``part_mib`` MiB, each folder with the whole manifest."""
    size, step = path.stat().st_size, int(part_mib * 2**20)
    count = -(-size // step)
    manifest |= {"archive_sha256": _sha256(path), "archive_bytes": size, "parts": count, "part_sha256": []}
    folders = []
    with open(path, "rb") as f:
        for k in range(1, count + 1):
            folder = into / f"dali-{k}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            (folder / "part").write_bytes(f.read(step))
            manifest["part_sha256"].append(_sha256(folder / "part"))
            folders.append(folder)
    for folder in folders:
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folders


def build(args: argparse.Namespace) -> dict:
    wheels = download(args.cache, args.python)
    with tempfile.TemporaryDirectory(prefix="dali-site-") as tmp:
        site = Path(tmp) / "site"
        sizes = unpack(wheels, site, args.python)
        start = time.perf_counter()
        xz = Path(tmp) / "dali.tar.xz"
        archive(site, xz, args.preset)
        manifest = {"dali": dali_version(), "python": args.python, "xz_preset": args.preset, **sizes,
                    "left_out": LEFT_OUT, "strip": list(STRIP) + ["other CPython versions' extension modules"],
                    "xz_seconds": time.perf_counter() - start}  # fmt: skip
        if args.keep_archive:
            shutil.copy(xz, args.keep_archive)
        split(xz, args.into, args.part_mib, manifest)
    print(json.dumps({k: v for k, v in manifest.items() if k != "part_sha256"}, indent=2))
    return manifest


def stash(args: argparse.Namespace) -> None:
    """Copy every carried ``.whl/dali-K/part`` to /tmp/dali-parts/part-K (checked against its manifest)."""
    args.parts.mkdir(parents=True, exist_ok=True)
    for folder in sorted(args.into.glob("dali-*")):
        k = int(folder.name.split("-")[1])
        manifest = json.loads((folder / "manifest.json").read_text())
        if _sha256(folder / "part") != manifest["part_sha256"][k - 1]:
            raise SystemExit(f"dali_bundle: {folder}/part does not match its manifest")
        shutil.copy(folder / "part", args.parts / f"part-{k}")
        shutil.copy(folder / "manifest.json", args.parts / "manifest.json")
        print(f"dali_bundle: part {k} of {manifest['parts']} stashed in {args.parts}")


class _Joined(io.RawIOBase):
    """The parts read back to back as one stream, without writing the whole archive again."""

    def __init__(self, paths: list[Path]):
        self._files = [open(p, "rb") for p in paths]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._files:
            n = self._files[0].readinto(buffer)
            if n:
                return n
            self._files.pop(0).close()
        return 0


def assemble(args: argparse.Namespace) -> None:
    """Unpack the archive into ``--site`` once every part is in /tmp/dali-parts; exit 3 (and say which part is
    missing: the machine went back between the calls) otherwise."""
    manifest = json.loads((args.parts / "manifest.json").read_text())
    paths = [args.parts / f"part-{k}" for k in range(1, manifest["parts"] + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        print(f"dali_bundle: {', '.join(missing)} missing in {args.parts}: the machine went back between calls")
        sys.exit(3)
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.read_bytes())
    if digest.hexdigest() != manifest["archive_sha256"]:
        raise SystemExit("dali_bundle: the joined parts do not match the archive's sha256")
    start = time.perf_counter()
    args.site.mkdir(parents=True, exist_ok=True)
    with lzma.open(io.BufferedReader(_Joined(paths)), "rb") as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        tar.extractall(args.site, filter="tar" if hasattr(tarfile, "tar_filter") else None)
    print(f"dali_bundle: DALI {manifest['dali']} unpacked into {args.site} in {time.perf_counter() - start:.1f} s")


CHECK = """
import sys, glob, numpy as np
from nvidia.dali import pipeline_def, fn, types
files = sorted(glob.glob(sys.argv[1] + "/train/*/*.jpg"))[:16]
@pipeline_def(batch_size=8, num_threads=2, device_id=None)
def pipe():
    jpegs, labels = fn.readers.file(files=files, labels=list(range(len(files))), name="r")
    images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    images = fn.resize(images, resize_shorter=72)
    return fn.crop_mirror_normalize(images, crop=(64, 64), mean=[124.0, 116.0, 104.0], std=[58.0, 57.0, 57.0],
                                    mirror=fn.random.coin_flip(), dtype=types.FLOAT, output_layout="CHW"), labels
p = pipe(); p.build()
for _ in range(2):
    images, labels = p.run()
    x = np.stack([np.asarray(t) for t in images])
    assert x.shape == (8, 3, 64, 64) and np.isfinite(x).all() and x.std() > 0.1, (x.shape, x.std())
import nvidia.dali
print("check ok:", nvidia.dali.__version__, nvidia.dali.__file__, x.shape, float(x.mean()), float(x.std()))
"""


def check(args: argparse.Namespace) -> None:
    """Build for ``--python``, unpack as the GPU machine would, and run DALI's CPU decode, resize and
    crop-mirror-normalize from the unpacked tree in ``--interpreter`` (one without DALI of its own)."""
    from benchmarks.make_jpegs import make_jpegs

    with tempfile.TemporaryDirectory(prefix="dali-check-") as tmp:
        tmp = Path(tmp)
        args.into, args.parts = tmp / "whl", tmp / "parts"
        build(args)
        stash(args)
        args.site = tmp / "site"
        assemble(args)
        make_jpegs(tmp / "jpegs", 32, 2)
        env = {**os.environ, "PYTHONPATH": str(args.site)}
        # -s: not even the interpreter's user site; only the unpacked tree and what that Python has
        subprocess.run([args.interpreter, "-s", "-c", CHECK, str(tmp / "jpegs")], env=env, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("build", "check"):
        s = sub.add_parser(name)
        s.add_argument("--python", default="312", help="CPython version the parts are for (default: 312)")
        s.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "convnets-dali-wheels")
        s.add_argument("--into", type=Path, default=ROOT / ".whl", help="where dali-K/ folders go")
        s.add_argument("--part-mib", type=float, default=56.0, help="most MiB a part (a call carries 64 MiB)")
        s.add_argument("--preset", type=int, default=6, help="xz preset")
        s.add_argument("--keep-archive", type=Path, help="also keep the whole archive here")
    sub.choices["check"].add_argument("--interpreter", required=True, help="a Python without DALI installed")
    s = sub.add_parser("stash")
    s.add_argument("--into", type=Path, default=ROOT / ".whl")
    s.add_argument("--parts", type=Path, default=PARTS)
    s = sub.add_parser("assemble")
    s.add_argument("--parts", type=Path, default=PARTS)
    s.add_argument("--site", type=Path, default=SITE)
    args = p.parse_args()
    {"build": build, "check": check, "stash": stash, "assemble": assemble}[args.command](args)


if __name__ == "__main__":
    main()
