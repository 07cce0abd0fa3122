"""The engine's own contracts, on CPU: which optimizer implementation runs where and why (no host sync in
``GradScaler.step``), resume keeping it, ``--compile``'s modes, and evaluation that reads the device once."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn as nn

from common.builders import build_optimizer, load_optimizer_state, optimizer_implementation
from common.config import TrainConfig, add_arguments, resolve
from common.errors import UserError
from common.evaluation import evaluate
from common.step import Optimization, Precision, StepRunner, build_optimization


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


class CountCalls:
    """Counts calls of a Tensor method (``item``, ``cpu``): the host reading a device value."""

    def __init__(self, monkeypatch, name: str):
        self.count, original = 0, getattr(torch.Tensor, name)

        def counted(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_optimizer_is_fused_on_cuda_where_torch_has_the_kernel_and_a_loop_on_cpu(name):
    cfg = TrainConfig(optimizer=name)
    cpu = build_optimizer(tiny_model(), cfg, lr=0.1)
    assert cpu.param_groups[0]["foreach"] is False and not cpu.param_groups[0].get("fused")
    # The CUDA choice, built on CPU parameters (torch has CPU kernels for what it fuses on CUDA).
    cuda = optimizer_implementation(name, "cuda")
    assert cuda == ({"fused": True, "foreach": False} if name != "rmsprop" else {"foreach": True})
    optimizer = type(cpu)(tiny_model().parameters(), lr=0.1, **cuda)
    assert getattr(optimizer, "_step_supports_amp_scaling", False) == (name != "rmsprop")


@pytest.mark.parametrize("device_type, reads", [("cuda", 0), ("cpu", 1)])
def test_a_fused_optimizer_lets_the_grad_scaler_step_without_reading_the_device(monkeypatch, device_type, reads):
    """With the CUDA choice (fused), an fp16 GradScaler steps, clips and updates without one ``.item()``;
    the foreach optimizer makes it read the inf flag on the host once per step (a sync on a GPU)."""
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, **optimizer_implementation("sgd", device_type)
    )
    opt = Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       torch.amp.GradScaler("cpu", enabled=True), clip_grad_norm=1.0)  # fmt: skip
    step = StepRunner(model, nn.CrossEntropyLoss(), opt, Precision(amp=False))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    step(x, y)  # the first step creates the scaler's state
    before = model[3].weight.detach().clone()
    items = CountCalls(monkeypatch, "item")
    for _ in range(3):
        step(x, y)
    assert items.count == 3 * reads
    assert not torch.equal(model[3].weight, before)  # the steps were taken, not skipped


def test_resume_keeps_this_runs_optimizer_implementation():
    """A checkpoint carries its optimizer's fused/foreach flags; loading it must not switch this run's
    fused optimizer to another code path (which would step on still-scaled gradients)."""
    model = tiny_model()
    saved = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **optimizer_implementation("sgd", "cpu"))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    saved.step()
    fused = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **optimizer_implementation("sgd", "cuda"))
    load_optimizer_state(fused, saved.state_dict())
    assert (fused.param_groups[0]["fused"], fused.param_groups[0]["foreach"]) == (True, False)
    assert torch.equal(fused.state[model[0].weight]["momentum_buffer"], saved.state[model[0].weight]["momentum_buffer"])
    loop = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **optimizer_implementation("sgd", "cpu"))
    load_optimizer_state(loop, fused.state_dict())
    assert (loop.param_groups[0]["fused"], loop.param_groups[0]["foreach"]) == (False, False)


def test_a_cpu_sgd_step_updates_in_place():
    """The engine's SGD step on the CPU allocates no parameter-sized temporaries beyond coupled weight decay's
    ``grad + wd * param``: foreach's per-tensor fallback made two more per parameter (``mul`` of the gradients by
    the learning rate, ...), which the allocator faults in anew every step."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.9, weight_decay=1e-4), lr=0.1)
    for _ in range(2):  # the second step has momentum buffers, as every later one
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            optimizer.step()
    counts = {e.key: e.count for e in prof.key_averages()}
    decayed = len(optimizer.param_groups[0]["params"])
    assert counts.get("aten::mul", 0) == 0, counts
    assert counts.get("aten::add", 0) <= decayed, counts


def test_build_optimization_scales_only_fp16_and_adds_ema_when_asked():
    cfg = TrainConfig(ema_decay=0.9, clip_grad_norm=2.0)
    opt = build_optimization(tiny_model(), cfg, lr=0.1, steps_per_epoch=10, precision=Precision(True, "float16"),
                             accumulation=2)  # fmt: skip
    assert opt.scaler.is_enabled() and opt.ema is not None and (opt.accumulation, opt.clip_grad_norm) == (2, 2.0)
    assert set(opt.state_dict()) == {"optimizer", "scheduler", "scaler", "ema"}
    bf16 = build_optimization(tiny_model(), TrainConfig(), 0.1, 10, Precision(True, "bfloat16"))
    assert not bf16.scaler.is_enabled() and bf16.ema is None


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    return vars(parser.parse_args(list(argv)))


def test_compile_takes_a_mode_alone_means_default_and_presets_may_name_one(tmp_path):
    assert parse("--compile")["compile"] == "default"
    assert parse("--compile", "reduce-overhead")["compile"] == "reduce-overhead"
    assert parse("--compile", "max-autotune", "--no-compile")["compile"] is None
    assert "compile" not in parse()  # unset: the preset or the default (eager) decides
    assert TrainConfig().compile is None
    preset = tmp_path / "preset.toml"
    for text, expected in (('compile = "reduce-overhead"', "reduce-overhead"), ("compile = true", "default"),
                           ("compile = false", None)):  # fmt: skip
        preset.write_text(text + "\n")
        assert resolve(TrainConfig, {}, str(preset)).compile == expected
    assert resolve(TrainConfig, {"compile": None}, str(preset)).compile is None
    preset.write_text('compile = "fast"\n')
    with pytest.raises(UserError, match="compile='fast' is not one of default, reduce-overhead"):
        resolve(TrainConfig, {}, str(preset))
    with pytest.raises(SystemExit):
        parse("--compile", "fast")


def logits_loader(batches):
    """Batches whose 'images' are the logits themselves, for an identity model."""
    return [(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)) for logits, labels in batches]


def test_evaluation_counts_on_the_device_and_reads_it_once(monkeypatch):
    """Per-class counts and the confusion matrix of a known set of predictions, last batch partial; the host
    reads the device the same number of times for 2 batches as for 6."""
    batches = [
        ([[3, 1, 0], [0, 2, 1], [0, 1, 2]], [0, 1, 1]),  # predicted 0, 1, 2
        ([[0, 0, 5], [4, 0, 0]], [2, 1]),  # predicted 2, 0 (partial batch)
    ]
    result = evaluate(nn.Identity(), logits_loader(batches), num_classes=3)
    assert result.confusion.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 1]]
    assert result.confusion.device.type == "cpu" and result.confusion.dtype == torch.int64
    assert (result.count, result.top1) == (5, pytest.approx(60.0))
    assert len(result.latencies_ms) == 2 and all(t >= 0 for t in result.latencies_ms)

    reads = []
    for repeat in (1, 3):
        items, cpus = CountCalls(monkeypatch, "item"), CountCalls(monkeypatch, "cpu")
        evaluate(nn.Identity(), logits_loader(batches * repeat), num_classes=3)
        reads.append((items.count, cpus.count))
        monkeypatch.undo()
    assert reads[0] == reads[1] and reads[0][1] == 1, reads


def test_evaluation_of_an_empty_shard_gives_zero_counts():
    result = evaluate(nn.Identity(), [], num_classes=4)
    assert result.count == 0 and result.confusion.shape == (4, 4) and int(result.confusion.sum()) == 0


def test_benchmark_times_the_images_it_reports():
    from common.benchmark import run_benchmark
    from common.config import BenchmarkConfig

    # One thread: a 4-image step is too small to share, and two spinning threads on a busy machine take seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = BenchmarkConfig(arch="mobilenet_v3_small", image_size=32, batch_size=4, iterations=3, warmup=1,
                          num_classes=10, data=None, workers=0)  # fmt: skip
    try:
        result = run_benchmark(cfg)
    finally:
        torch.set_num_threads(threads)
    assert result["images_timed"] == cfg.iterations * cfg.batch_size
    assert result["throughput_img_s"] == pytest.approx(result["images_timed"] / result["seconds_timed"])
    assert result["compile"] is None and result["amp"] is False


def test_weight_average_matches_torchs_ema_reading_the_device_once(monkeypatch):
    """Same averages and state_dict as ``AveragedModel`` with torch's EMA function, also after a checkpoint
    load; but the device count is read once, not twice per update (two syncs per optimizer step on a GPU)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from common.step import WeightAverage

    torch.manual_seed(0)
    model = tiny_model()
    ours = WeightAverage(model, 0.9)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    reads = {"ours": 0, "torch's": 0}
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 8, 8))  # moves BatchNorm's running statistics
        for name, average in (("ours", ours), ("torch's", torchs)):
            counts = [CountCalls(monkeypatch, method) for method in ("__bool__", "__int__", "item")]
            average.update_parameters(model)
            reads[name] += sum(c.count for c in counts)
            monkeypatch.undo()
    assert reads == {"ours": 1, "torch's": 8}
    for (name, a), b in zip(ours.state_dict().items(), torchs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    resumed = WeightAverage(tiny_model(), 0.9)
    resumed.load_state_dict(ours.state_dict())
    resumed.update_parameters(model)
    torchs.update_parameters(model)
    for a, b in zip(resumed.state_dict().values(), torchs.state_dict().values(), strict=True):
        assert torch.equal(a, b)
