"""Host memory and NVIDIA GPU telemetry (utilisation, memory, power sampled through pynvml)."""

from __future__ import annotations

import logging
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


class GpuSampler:
    """Samples utilisation, memory and power of one GPU in a background thread while a benchmark runs.

    Does nothing (and says so in ``summary``) where NVML is not available.
    """

    def __init__(self, index: int, interval_s: float = 0.1):
        self.index, self.interval_s = index, interval_s
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # noqa: BLE001 - no driver, no GPU, no library
            log.debug("pynvml unavailable: %s", e)
            self._nvml = None

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            util = nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            mem = nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
            power = nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000
            self.samples.append((util, mem, power))
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
        if not self.samples:
            return None
        util, mem, power = zip(*self.samples, strict=True)
        return {
            "gpu_util_mean_pct": sum(util) / len(util),
            "gpu_memory_used_max_mb": max(mem),
            "gpu_power_mean_w": sum(power) / len(power),
            "gpu_power_max_w": max(power),
            "samples": len(self.samples),
        }
