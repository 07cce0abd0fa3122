"""Host memory and NVIDIA GPU telemetry (utilisation, memory, power sampled through pynvml)."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time

log = logging.getLogger(__name__)


def host_rss_mb() -> float:
    """Current resident set size of this process, in MiB (what a loader leak would grow)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def host_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# What can change a CPU run's numbers beyond its configuration: thread counts (a different reduction order
# perturbs every step, and a short high-learning-rate schedule turns that into points of top-1), the libraries'
# versions, and the instruction sets oneDNN picks its kernels by (AVX-512 and bf16 units differ between hosts
# of one cloud "kind").
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "KMP_AFFINITY",
    "ONEDNN_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
PACKAGES = ("torch", "torchvision", "numpy", "pillow", "nvidia-dali-cuda130")


def cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        return set()


def run_environment() -> dict:
    """Threads, thread variables, package versions, CPU model and instruction sets of this process."""
    import platform
    from importlib import metadata

    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    flags = cpu_flags()
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "thread_variables": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "python": platform.python_version(),
        "versions": versions,
        "cpu_model": cpu_model(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
    }


def nvml_handle(cuda_index: int):
    """(pynvml, handle) of the GPU that torch calls ``cuda:<cuda_index>``.

    NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so with a subset of the GPUs (Slurm,
    Kubernetes) the same index names another card; the UUID names the same one in both.
    """
    import pynvml
    import torch

    pynvml.nvmlInit()
    try:
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception as e:  # noqa: BLE001 - no UUID from an old driver: map through CUDA_VISIBLE_DEVICES
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        index = int(visible[cuda_index]) if cuda_index < len(visible) and visible[cuda_index].isdigit() else cuda_index
        log.debug("NVML lookup by UUID failed (%s); using NVML index %d", e, index)
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)


def _query(fn, *args, scale: float = 1.0) -> float | None:
    """One NVML reading, or None where the device does not report it (MIG slices, some vGPUs)."""
    try:
        return fn(*args) / scale
    except Exception:  # noqa: BLE001 - pynvml raises NVMLError_NotSupported and friends
        return None


class GpuSampler:
    """Samples utilisation, memory, power and SM clock of one GPU in a background thread while a benchmark runs.

    Does nothing (and says so in ``summary``) where NVML is not available.
    """

    def __init__(self, index: int, interval_s: float = 0.1):
        self.index, self.interval_s = index, interval_s
        self.samples: list[tuple[float | None, ...]] = []
        self._stop = threading.Event()
        self._thread = None
        try:
            self._nvml, self._handle = nvml_handle(index)
        except Exception as e:  # noqa: BLE001 - no driver, no GPU, no library
            log.debug("pynvml unavailable: %s", e)
            self._nvml = None

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            util = _query(lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu, self._handle)
            mem = _query(lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used, self._handle, scale=2**20)
            power = _query(nvml.nvmlDeviceGetPowerUsage, self._handle, scale=1000)
            clock = _query(nvml.nvmlDeviceGetClockInfo, self._handle, nvml.NVML_CLOCK_SM)
            self.samples.append((util, mem, power, clock))
            time.sleep(self.interval_s)

    def __enter__(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict | None:
        """Means and maxima of what was sampled; a reading the device never gave is left out."""
        if not self.samples:
            return None
        util, mem, power, clock = ([v for v in column if v is not None] for column in zip(*self.samples, strict=True))
        out = {"samples": len(self.samples)}
        if util:
            out["gpu_util_mean_pct"] = sum(util) / len(util)
        if mem:
            out["gpu_memory_used_max_mb"] = max(mem)
        if power:
            out["gpu_power_mean_w"] = sum(power) / len(power)
            out["gpu_power_max_w"] = max(power)
        if clock:  # a falling SM clock under load is thermal or power throttling
            out["gpu_sm_clock_mean_mhz"] = sum(clock) / len(clock)
            out["gpu_sm_clock_min_mhz"] = min(clock)
        return out


@contextlib.contextmanager
def system_metrics(device, enabled: bool = True, interval_s: float = 1.0):
    """Yields a dict that holds, after the block, this process's GPU over it as ``system.*`` values (mean
    utilisation, peak memory, mean and peak power, SM clock) sampled through NVML; empty on a CPU, where NVML
    is missing, or when not ``enabled`` (the other ranks: their GPUs are not logged)."""
    out: dict = {}
    if not enabled or device.type != "cuda":
        yield out
        return
    with GpuSampler(device.index, interval_s) as sampler:
        yield out
    out.update({f"system.{k}": v for k, v in (sampler.summary() or {}).items() if k != "samples"})
