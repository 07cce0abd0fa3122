"""`convnets benchmark --mode formats`: a trained checkpoint in several formats, each timed at every batch size and
its top-1 counted as `evaluate` counts it, in one table and one JSON file; formats that cannot run here listed with
the reason (a missing GPU or package, a runner that fails); and the report's section built from that file."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest
import torch

from common import cli, config
from common.errors import UserError
from common.formats import runners
from common.formats.measure import parse_batch_sizes, run_formats, selected_formats

pytest.importorskip("onnxruntime", reason="needs the serve extra: pip install -e '.[serve]'")

MEASURED = ["eager", "channels_last", "torchscript", "onnxruntime", "onnxruntime-int8"]


def _fails_like_a_missing_compiler(subject):
    def run(x):
        raise RuntimeError("InductorError: no C++ compiler found\n(more lines of a traceback)")

    return run


@pytest.fixture(scope="module")
def formats_run(trained_colors, tmp_path_factory):
    """One run over a few formats (torch.compile left out: about a minute of compiling per batch size here) plus a
    runner that fails at its first call, and the formats this machine may lack."""
    data, checkpoint = trained_colors
    out = tmp_path_factory.mktemp("formats")
    broken = runners.Format("broken", _fails_like_a_missing_compiler, "cpu", "fp32", "fails as inductor would")
    names = [*MEASURED, "broken", "onnxruntime-cuda", "tensorrt-fp16"]
    cfg = config.BenchmarkConfig(mode="formats", checkpoint=str(checkpoint), data=str(data), batch_sizes="4,1",
                                 formats=",".join(names), iterations=3, warmup=1, workers=0, device="cpu",
                                 json=str(out / "results" / "cpu" / "formats_resnet18.json"))  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setitem(runners.FORMATS, "broken", broken)
        try:
            result = run_formats(cfg)
        finally:
            torch.set_num_threads(threads)
    return result, out, printed.getvalue()


def test_every_format_is_timed_at_every_batch_size(formats_run):
    result, out, _ = formats_run
    assert json.loads((out / "results" / "cpu" / "formats_resnet18.json").read_text()) == result
    assert list(result["formats"]) == MEASURED and result["batch_sizes"] == [1, 4]
    for name, f in result["formats"].items():
        assert list(f["by_batch_size"]) == ["1", "4"], name
        for t in f["by_batch_size"].values():
            ms = t["latency_ms"]
            assert t["iterations"] == 3 and t["throughput_img_s"] > 0 and 0 < ms["p50"] <= ms["p90"] <= ms["p99"]
    assert result["formats"]["onnxruntime-int8"]["precision"] == "int8"
    assert result["calibration_images"] == 96  # DATA/train, all of it (fewer than the 512 asked for)


def test_top1_per_format_is_evaluates(formats_run, trained_colors, tmp_path):
    """Eager's top-1 is `convnets evaluate`'s on the same folder; the FP32 exports agree with eager to the image;
    the INT8 model, calibrated on the training images, loses at most 2 of the 48."""
    from common.inference import run_evaluate

    result, _, _ = formats_run
    data, checkpoint = trained_colors
    cfg = config.EvaluateConfig(checkpoint=str(checkpoint), data=str(data), data_backend="pytorch", workers=0,
                                output=str(tmp_path), json=True, device="cpu")  # fmt: skip
    evaluated = run_evaluate(cfg)
    top1 = {name: f["top1"] for name, f in result["formats"].items()}
    assert top1["eager"] == pytest.approx(evaluated["top1"])
    assert {top1[n] for n in ("channels_last", "torchscript", "onnxruntime")} == {top1["eager"]}
    assert top1["eager"] - top1["onnxruntime-int8"] <= 2 * 100 / 48 + 1e-9
    assert {f["eval_images"] for f in result["formats"].values()} == {48}


def test_formats_that_cannot_run_are_listed_with_the_reason(formats_run):
    result, _, _ = formats_run
    missing = result["unavailable"]
    assert missing["broken"] == "failed: RuntimeError: InductorError: no C++ compiler found"
    if not torch.cuda.is_available():
        assert missing["onnxruntime-cuda"].startswith("needs a CUDA GPU")
    if importlib.util.find_spec("tensorrt") is None:
        assert missing["tensorrt-fp16"] == (
            "needs the `tensorrt` Python package (pip install tensorrt), which is not installed"
        )


def test_table_and_report_section(formats_run, tmp_path):
    from benchmarks import report
    from common.formats.measure import table

    result, out, printed = formats_run
    assert printed.strip() == table(result)
    text = printed.splitlines()
    rows = {line.split()[0]: line for line in text if line and line.split()[0] in result["formats"]}
    assert list(rows) == MEASURED
    assert f"{result['formats']['onnxruntime-int8']['top1']:.2f}%" in rows["onnxruntime-int8"]
    assert "  broken: failed: RuntimeError" in "\n".join(text)
    readme = report.build(out / "results", tmp_path).read_text()
    assert "## Every format: speed and accuracy" in readme
    row = next(line for line in readme.splitlines() if line.startswith("| onnxruntime-int8 | int8 | cpu |"))
    t = result["formats"]["onnxruntime-int8"]["by_batch_size"]["4"]
    assert f"{t['throughput_img_s']:,.1f} ({t['latency_ms']['p50']:.2f} / " in row
    assert "**broken** (failed: RuntimeError" in readme
    assert (tmp_path / "plots" / "cpu_formats.png").stat().st_size > 10_000


def test_cli_reaches_the_formats_benchmark(monkeypatch):
    import common.formats

    seen = []
    monkeypatch.setattr(common.formats, "run_formats", seen.append)
    args = cli.build_parser().parse_args(["benchmark", "--mode", "formats", "--checkpoint", "c.pt", "--data", "d",
                                          "--batch-sizes", "1,8", "--formats", "eager,onnxruntime"])  # fmt: skip
    assert args.func(args) == 0
    (cfg,) = seen
    assert (cfg.mode, cfg.checkpoint, cfg.data, cfg.batch_sizes, cfg.formats) == (
        "formats", "c.pt", "d", "1,8", "eager,onnxruntime")  # fmt: skip


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: parse_batch_sizes("1,x"), "--batch-sizes takes whole numbers separated by commas, got '1,x'"),
        (lambda: parse_batch_sizes("0,8"), "--batch-sizes must list batch sizes of at least 1, got '0,8'"),
        (lambda: selected_formats("eager,tflite"), "--formats: unknown tflite; known: eager, channels_last"),
        (lambda: run_formats(config.BenchmarkConfig(mode="formats", data="d")), "--mode formats needs --checkpoint"),
    ],
)
def test_refusals(call, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_registry_refuses_a_second_format_of_one_name():
    with pytest.raises(ValueError, match="'eager' is registered twice"):
        runners.register("eager", "cpu", "fp32", "again")(lambda subject: None)
    assert runners.FORMATS["eager"].description.startswith("PyTorch eager")


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs the openvino extra (pip install "
                    "-e '.[openvino]', which make setup does)")  # fmt: skip
def test_openvino_runs_the_fp32_and_int8_onnx_models(trained_colors, tmp_path):
    """OpenVINO reads the same two ONNX models as ONNX Runtime (the INT8 one made once for both): the same FP32
    top-1, and INT8 within an image of ONNX Runtime's INT8."""
    data, checkpoint = trained_colors
    cfg = config.BenchmarkConfig(mode="formats", checkpoint=str(checkpoint), data=str(data), batch_sizes="2",
                                 formats="onnxruntime,onnxruntime-int8,openvino,openvino-int8", iterations=1, warmup=1,
                                 workers=0, device="cpu", json=str(tmp_path / "openvino.json"))  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        result = run_formats(cfg)
    top1 = {name: f["top1"] for name, f in result["formats"].items()}
    assert list(top1) == ["onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8"], result["unavailable"]
    assert top1["openvino"] == top1["onnxruntime"]
    assert abs(top1["openvino-int8"] - top1["onnxruntime-int8"]) <= 100 / 48 + 1e-9
