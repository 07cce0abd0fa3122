"""What a benchmark ran on: device, driver, library versions, machine load; and the precisions it supports."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from common.telemetry import cpu_flags, cpu_model

ROOT = Path(__file__).resolve().parent.parent


def cpu_has_native_bf16() -> bool:
    """bf16 on a CPU is only worth timing where it has bf16 instructions; elsewhere autocast emulates it, slower
    than fp32, and the figure would mislead."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def precisions(device: torch.device) -> list[str]:
    """Every precision the device runs natively: fp32, tf32 and AMP fp16/bf16 on a GPU; fp32 (and bf16 with
    native support) on a CPU."""
    if device.type == "cuda":
        found = ["fp32"]
        if torch.cuda.get_device_capability(device) >= (8, 0):
            found.append("tf32")
        found.append("amp-fp16")
        if torch.cuda.is_bf16_supported():
            found.append("amp-bf16")
        return found
    return ["fp32", "amp-bf16"] if cpu_has_native_bf16() else ["fp32"]


def precision_options(precision: str) -> dict:
    """BenchmarkConfig fields for one precision name."""
    return {
        "fp32": {"amp": False, "tf32": False},
        "tf32": {"amp": False, "tf32": True},
        "amp-fp16": {"amp": True, "amp_dtype": "float16", "tf32": True},
        "amp-bf16": {"amp": True, "amp_dtype": "bfloat16", "tf32": True},
    }[precision]


def device_slug(device: torch.device) -> str:
    """Folder name under benchmarks/results/: ``cpu``, or the GPU's name (``NVIDIA-H100-80GB-HBM3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]", "", torch.cuda.get_device_name(device).replace(" ", "-"))


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Device, versions and load, recorded in every result file."""
    env = {
        "device_type": device.type,
        "device_slug": device_slug(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dali": _version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
        "onnxruntime": _version("onnxruntime-gpu", "onnxruntime"),
        "git_commit": _git_commit(),
        "loadavg": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env |= {
            "gpu_name": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": _nvidia_driver(),
        }
    return env


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - no NVML: the driver is simply not recorded
        return None
