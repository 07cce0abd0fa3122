"""The benchmark suite (benchmarks/suite.py, ratios.py) and the report that rebuilds benchmarks/README.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import environment, ratios, report, suite
from common.errors import UserError

H100 = "NVIDIA H100 80GB HBM3"


def _point(mode, model, precision, batch, img_s, *, arch=None, std=1.0, p99=10.0, gpu=None, macs=None, **extra):
    point = {
        "kind": "point", "mode": mode, "model": model, "arch": arch or model, "width_mult": None,
        "precision": precision, "batch_size": batch, "image_size": 224, "data_backend": "synthetic",
        "iterations": 5, "warmup": 2, "repeats": 3, "throughput_img_s": img_s, "throughput_img_s_std": std,
        "latency_ms": {"p50": p99 / 2, "p90": p99, "p95": p99, "p99": p99, "mean": p99 / 2},
        "params": 25_557_032, "macs_per_image_forward": 4_089_184_256, "loadavg_before": [0.5, 0.5, 0.5],
        "device": gpu or "AMD EPYC (2 threads)", "environment": {"gpu_name": gpu} if gpu else {"cpu_model": "EPYC"},
    }  # fmt: skip
    if macs is not None:
        point["achieved_macs_per_s"] = macs
    return point | extra


def _write(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data))


@pytest.fixture
def results(tmp_path):
    """A CPU folder (suite points, a training run, a ratio) and an H100 folder, as the suite writes them."""
    cpu, gpu = tmp_path / "results" / "cpu", tmp_path / "results" / H100.replace(" ", "-")
    _write(cpu, "a", _point("train", "resnet18", "fp32", 8, 40.0))
    _write(cpu, "b", _point("train", "resnet18", "fp32", 32, 55.5))
    _write(cpu, "c", _point("inference", "resnet18", "fp32", 1, 80.0, p99=12.3))
    _write(cpu, "d", _point("inference", "resnet18", "fp32", 32, 300.0, p99=99.0))
    _write(cpu, "train_resnet18_fashion_mnist", {
        "final_top1": 90.21, "arch": "resnet18", "width_mult": None, "image_size": 32, "epochs": 9,
        "data": "data/fashion-mnist", "device": "AMD EPYC (2 threads)",
        "per_epoch": [{"train.total_ips": 500.0}, {"train.total_ips": 600.0}],
    })  # fmt: skip
    _write(cpu, "ratio_engine_vs_plain_loop", {
        "comparison": "engine_vs_plain_loop", "arch": "resnet18", "image_size": 64, "batch_size": 16,
        "engine_img_s_median": 50.0, "plain_img_s_median": 52.0, "overhead_pct": 4.0, "overhead_limit_pct": 10.0,
        "within_limit": True,
    })  # fmt: skip
    # 2,470 img/s is DeepLearningExamples' A100 figure; ours on the H100 is 3,000, at half the fp16 peak's MACs.
    half_peak_macs = 0.5 * 989.4e12 / 2
    best = _point("train", "resnet50", "amp-fp16", 256, 3000.0, gpu=H100, macs=half_peak_macs)
    _write(gpu, "e", best | {"gpu": {"gpu_power_mean_w": 600.0}})
    _write(gpu, "f", _point("train", "resnet50", "amp-fp16", 128, 2900.0, gpu=H100))
    return tmp_path / "results"


def test_report_tables_devices_references_and_plots(results, tmp_path):
    readme = report.build(results, tmp_path / "out").read_text()
    # Devices grouped by folder; the GPU labelled with its name, the CPU with its own.
    assert f"## {H100} (GPU) (`results/{H100.replace(' ', '-')}/`): summary" in readme
    assert "## AMD EPYC (2 threads) (`results/cpu/`): summary" in readme
    # The summary row takes the best batch size of each mode, the batch-1 p99 and the measured top-1.
    row = next(line for line in readme.splitlines() if line.startswith("| resnet18 | fp32 | 224 |"))
    assert "55.5 ± 1.0" in row and "(32)" in row and "300.0 ± 1.0" in row and "| 12.3 |" in row
    assert "90.21%" in row and "Fashion-MNIST, 32 px" in row and "25.56" in row
    # MFU against the H100's dense fp16 peak, images per second per watt; a CPU has no peak.
    gpu_row = next(
        line for line in readme.splitlines() if "| train | resnet50 | amp-fp16 | 224 | synthetic | 256 |" in line
    )
    assert "| 50.0% |" in gpu_row and "| 5.00 |" in gpu_row
    assert "unknown peak (CPU)" in readme
    # Published numbers labelled as theirs, ours beside them where we measured the same thing.
    dle = next(line for line in readme.splitlines() if "| 938 |" not in line and "| 2,470 |" in line)
    assert "A100 80GB" in dle and "3,000]" in dle and f"{H100} (GPU)" in dle
    assert "## Published references (theirs)" in readme
    assert "overhead +4.0% (within the 10% limit)" in readme
    for name in ("cpu_throughput.png", "cpu_latency.png", "accuracy_vs_throughput.png",
                 f"{H100.replace(' ', '-')}_throughput.png"):  # fmt: skip
        png = tmp_path / "out" / "plots" / name
        assert f"(plots/{name})" in readme
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_names_a_broken_result_file(results, tmp_path):
    (results / "cpu" / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json"):
        report.build(results, tmp_path / "out")


def test_peak_lookup_prefers_the_pcie_entry_and_knows_no_cpu_peak():
    refs = report.load_references()
    assert report.peak_flops("NVIDIA H100 PCIe", "amp-bf16", refs)[0] == 756e12
    assert report.peak_flops(H100, "tf32", refs)[0] == pytest.approx(494.7e12)
    assert report.peak_flops(None, "fp32", refs) == (None, "unknown peak (CPU)")


def test_suite_arguments():
    plan, _ = suite.parse_args(["--quick"])
    assert plan == suite.QUICK
    plan, args = suite.parse_args(
        ["--models", "resnet18,vgg16_bn", "--iterations", "2", "--pipelines", "", "--no-grid"]
    )
    assert plan.models == ("resnet18", "vgg16_bn") and plan.iterations == 2 and plan.pipelines == ()
    assert plan.grid_widths == () and plan.train_batch_sizes == suite.FULL.train_batch_sizes
    with pytest.raises(UserError, match="resnet9000"):
        suite.parse_args(["--models", "resnet18,resnet9000"])
    with pytest.raises(UserError, match="fp8"):
        suite.parse_args(["--precisions", "fp32,fp8"])


def test_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    import torch

    monkeypatch.setattr(environment, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert environment.precisions(torch.device("cpu")) == ["fp32"]
    monkeypatch.setattr(environment, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert environment.precisions(torch.device("cpu")) == ["fp32", "amp-bf16"]


def test_interleaved_ratios_are_medians_over_the_baseline():
    calls = []
    samples = iter([10.0, 30.0, 12.0, 33.0, 11.0, 90.0])
    sides = {
        "base": lambda: (calls.append("base"), next(samples))[1],
        "fast": lambda: (calls.append("fast"), next(samples))[1],
    }
    result = ratios._summarise(ratios._interleave(sides, 3), "base")
    assert calls == ["base", "fast"] * 3
    assert result["img_s_median"] == {"base": 11.0, "fast": 33.0} and result["ratio_to_baseline"]["fast"] == 3.0


# fp32 pinned: unpinned, the suite also times amp-bf16 on a CPU with native bf16, and the files written would depend
# on which CPU the tests land on.
TINY_RUN = ["--models", "resnet18", "--train-batch-sizes", "2", "--inference-batch-sizes", "1", "--image-size", "32",
            "--iterations", "2", "--warmup", "1", "--repeats", "2", "--pipelines", "", "--no-grid", "--no-ratios",
            "--device", "cpu", "--precisions", "fp32"]  # fmt: skip
NO_BF16, NATIVE_BF16 = {"avx2", "avx512f"}, {"avx512f", "avx512_bf16"}


@pytest.mark.parametrize("flags", [NO_BF16, NATIVE_BF16], ids=["no-bf16", "native-bf16"])
def test_suite_times_the_precisions_asked_for_whatever_the_cpu(monkeypatch, flags):
    import torch

    monkeypatch.setattr(environment, "cpu_flags", lambda: flags)
    supported = environment.precisions(torch.device("cpu"))
    plan, _ = suite.parse_args(TINY_RUN)
    assert suite.choose_precisions(plan.precisions, supported) == (["fp32"], [])
    plan, _ = suite.parse_args([a for a in TINY_RUN if a not in ("--precisions", "fp32")])
    assert suite.choose_precisions(plan.precisions, supported) == (supported, [])
    assert suite.choose_precisions(("fp32", "amp-fp16"), supported) == (["fp32"], ["amp-fp16"])


def test_tiny_real_run_writes_complete_results(tmp_path, monkeypatch):
    # As on a CPU with native bf16 (where this test once found four files): the pinned fp32 is all that runs.
    monkeypatch.setattr(environment, "cpu_flags", lambda: NATIVE_BF16)
    plan, args = suite.parse_args([*TINY_RUN, "--out", str(tmp_path / "cpu")])
    written = suite.run(plan, args)
    assert sorted(p.name for p in written) == [
        "suite_inference_resnet18_fp32_bs1_synthetic_32px.json", "suite_train_resnet18_fp32_bs2_synthetic_32px.json"
    ]  # fmt: skip
    r = json.loads(written[0].read_text())
    assert r["repeats"] == 2 and len(r["throughput_img_s_repeats"]) == 2 and r["images_timed"] == 2 * 2 * 2
    assert r["args"]["iterations"] == 2 and r["args"]["warmup"] == 1 and r["warmup"] == 1
    env = r["environment"]
    assert env["cpu_count"] >= 1 and env["torch"] and env["torchvision"] and len(env["loadavg"]) == 3
    assert r["throughput_img_s_std"] >= 0 and r["achieved_macs_per_s"] > 0
    readme = report.build(tmp_path, tmp_path / "out").read_text()
    assert "suite_train_resnet18_fp32_bs2_synthetic_32px.json" in readme
