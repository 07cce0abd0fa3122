"""benchmarks/gpu_session.sh in its dry mode, end to end, so that the one GPU call of a session is not where it is
debugged (issue 20, part A); and the DALI parts' split, stash and reassembly, without the 200 MB download."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from benchmarks import dali_bundle
from benchmarks.gpu_session import DEFAULT_STEPS
from common.cli import build_parser
from tests.conftest import ONE_THREAD, ROOT

FORCED_TIMEOUT = "train_compile"  # the slowest dry step: forcing it out also keeps this test short


@pytest.fixture(scope="module")
def dry_session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-session")
    env = {**os.environ, **ONE_THREAD, "OUT": str(tmp / "out"), "DRY": "1", "PYTHON": sys.executable,
           "GPU_SESSION_LIMITS": f"{FORCED_TIMEOUT}=1"}  # fmt: skip
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--work", str(tmp / "work")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc, tmp / "out"


def test_every_step_has_an_entry_and_a_forced_timeout_does_not_stop_the_rest(dry_session):
    proc, out = dry_session
    results = json.loads((out / "results.json").read_text())
    steps = {s["name"]: s for s in results["steps"]}
    assert list(steps) == list(DEFAULT_STEPS), proc.stdout + proc.stderr
    assert steps[FORCED_TIMEOUT]["status"] == "timed_out", steps[FORCED_TIMEOUT]
    assert proc.returncode == 1  # a step that did not finish is a failed session
    after = list(DEFAULT_STEPS)[list(DEFAULT_STEPS).index(FORCED_TIMEOUT) + 1 :]
    assert after and all(steps[name]["records"] for name in after)  # the steps after it still ran
    for name, step in steps.items():
        if name == FORCED_TIMEOUT:
            continue
        assert step["status"] in ("ok", "skipped"), step
        assert step["status"] == "ok" or step["reason"], step
        for record in step["records"]:
            assert record["status"] in ("ok", "skipped"), record
            assert record["status"] == "ok" or record["reason"], record
    # Without CUDA tests/test_gpu.py skips itself, and says why
    assert steps["gpu_tests"]["status"] == "skipped" and "CUDA" in steps["gpu_tests"]["reason"]
    assert results["session"]["dry"] is True and results["session"]["limits_s"][FORCED_TIMEOUT] == 1
    assert len(list(out.iterdir())) <= 8  # what the GPU machine sends back
    assert "gpu_session: DRY" in (out / "session.log").read_text()


def test_the_figures_are_real_numbers(dry_session):
    _, out = dry_session
    records = {r["name"]: r for s in json.loads((out / "results.json").read_text())["steps"] for r in s["records"]}
    trained = [r for r in records.values() if r["status"] == "ok" and "throughput_img_s" in r]
    backends = {r.get("data_backend") for r in trained}
    assert {"synthetic", "pytorch"} <= backends, sorted(records)
    for r in trained:
        assert r["throughput_img_s"] > 0 and r["flops_per_image"] > 0 and r["achieved_tflops"] > 0, r
        assert r["mfu"] is None  # no peak for a CPU: null, not a made-up figure
    # The command each figure carries reruns it: `convnets benchmark` parses it back to the same settings.
    command = records["engine_synthetic"]["command"].split()
    assert command[:2] == ["convnets", "benchmark"]
    args = build_parser().parse_args(command[1:])
    assert (args.arch, args.batch_size, args.data_backend, args.amp) == ("resnet18", 4, "synthetic", False)
    assert records["engine_vs_baselines"]["engine_over_plain_loop"] > 0
    assert records["jpegs"]["count"] == 40 and records["jpegs"]["estimated_s_for_target"] > 0
    assert (
        records["process_group_of_one"]["grad_max_abs_diff"] <= 1e-3 * records["process_group_of_one"]["grad_max_abs"]
    )
    for name in ("eager_bs1", "channels_last_bs1", "onnxruntime_bs1", "compiled_cuda_graphs_bs1"):
        assert records[name]["latency_ms"]["p50"] > 0, records[name]
    assert {"mobilenet_v1_0.5_train", "vgg16_bn_inference"} <= set(records)
    profile = (out / "profile.txt").read_text()
    assert "DRY" in profile and "aten::" in profile
    assert records["environment"]["sizes"]["device"] == "cpu"


def test_stripping_keeps_the_target_python_and_the_jpeg_codecs():
    assert dali_bundle._stripped("nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so", "312")
    assert dali_bundle._stripped("nvidia/dali/backend_impl.cpython-314t-x86_64-linux-gnu.so", "312")
    assert not dali_bundle._stripped("nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so", "312")
    assert dali_bundle._stripped("nvidia/dali/include/dali/core/common.h", "312")
    assert dali_bundle._stripped("nvidia/nvimgcodec/extensions/libopencv_ext.so.0.9.0", "312")
    assert not dali_bundle._stripped("nvidia/nvimgcodec/extensions/libjpeg_turbo_ext.so.0.9.0", "312")
    assert not dali_bundle._stripped("nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.0.9.0", "312")
    assert not dali_bundle._stripped("nvidia/dali/.libs/libcvcuda-90d2d242.so.0", "312")


def test_dali_parts_are_reassembled_only_when_all_are_there(tmp_path):
    site = tmp_path / "site"
    (site / "nvidia" / "dali").mkdir(parents=True)
    payload = os.urandom(300_000)  # incompressible: the archive needs several 0.1 MiB parts
    (site / "nvidia" / "dali" / "lib.so").write_bytes(payload)
    (site / "nvidia" / "dali" / "__init__.py").write_text("__version__ = 'test'\n")
    dali_bundle.archive(site, tmp_path / "a.tar.xz", preset=0)
    os.utime(site / "nvidia" / "dali" / "lib.so", (1, 1))  # unpacked again later: other times, the same bytes
    dali_bundle.archive(site, tmp_path / "b.tar.xz", preset=0)
    assert (tmp_path / "a.tar.xz").read_bytes() == (tmp_path / "b.tar.xz").read_bytes()  # reproducible
    folders = dali_bundle.split(tmp_path / "a.tar.xz", tmp_path / "whl", 0.1, {"dali": "test"})
    assert len(folders) >= 3
    parts, unpacked = tmp_path / "parts", tmp_path / "unpacked"
    # One call at a time carries one part; the last call finds the earlier ones stashed.
    for folder in folders[:-1]:
        call = tmp_path / f"call-{folder.name}"
        call.mkdir()
        folder.rename(call / folder.name)
        dali_bundle.stash(argparse.Namespace(into=call, parts=parts))
    with pytest.raises(SystemExit) as missing:
        dali_bundle.assemble(argparse.Namespace(parts=parts, site=unpacked))
    assert missing.value.code == 3
    dali_bundle.stash(argparse.Namespace(into=tmp_path / "whl", parts=parts))
    dali_bundle.assemble(argparse.Namespace(parts=parts, site=unpacked))
    assert (unpacked / "nvidia" / "dali" / "lib.so").read_bytes() == payload
    (parts / "part-1").write_bytes(b"corrupt")
    with pytest.raises(SystemExit, match="sha256"):
        dali_bundle.assemble(argparse.Namespace(parts=parts, site=tmp_path / "again"))
