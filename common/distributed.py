"""Distributed set-up from torchrun's environment, and small pure helpers around it."""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common.errors import UserError

log = logging.getLogger(__name__)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node, as torchrun sets it (0 for a plain process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device, rank and the size of the job."""

    device: torch.device
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# The oldest NVIDIA driver each CUDA major version runs on (minor-version compatibility: any 12.x runs on 525+).
# From NVIDIA's CUDA Toolkit release notes, "CUDA Toolkit and Minimum Required Driver Version".
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
# What to install instead of a wheel the driver is too old for: the newest CUDA each driver generation runs.
OLDER_WHEEL = ((525, "cu126", "12.6"), (450, "cu118", "11.8"))


def nvidia_driver_version(proc_file: str = "/proc/driver/nvidia/version") -> str | None:
    """The loaded NVIDIA kernel driver's version: "" where NVIDIA devices exist but the version cannot be read,
    None on a machine without NVIDIA devices."""
    try:
        text = Path(proc_file).read_text()
        match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
        return match.group(1) if match else ""
    except OSError:
        pass
    if not glob.glob("/dev/nvidia[0-9]*"):
        return None
    try:  # a container may show the devices without /proc/driver/nvidia
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - NVML missing or not loadable: the devices are still there
        return ""


def cuda_unusable_reason(driver: str, torch_cuda: str | None) -> str:
    """Why CUDA is not usable on a machine whose NVIDIA driver is ``driver``, for a torch built with ``torch_cuda``."""
    if torch_cuda is None:
        return (
            f"this torch {torch.__version__} is a CPU-only build: install a CUDA build of torch "
            "(pip install torch --index-url https://download.pytorch.org/whl/cu126, or the NGC PyTorch container)"
        )
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    major = int(torch_cuda.split(".")[0])
    needed = MIN_DRIVER.get(major)
    found = int(driver.split(".")[0]) if driver[:1].isdigit() else None
    if needed is not None and found is not None and found < needed:
        older = next(((tag, cuda) for floor, tag, cuda in OLDER_WHEEL if found >= floor), None)
        instead = (
            f"install a torch wheel built for CUDA {older[1]} (pip install torch torchvision --index-url "
            f"https://download.pytorch.org/whl/{older[0]}; for DALI, nvidia-dali-cuda{older[1].split('.')[0]}0)"
            if older
            else "no current torch wheel supports it"
        )
        return (
            f"NVIDIA driver {driver} is too old for this torch {torch.__version__}, built with CUDA {torch_cuda}, "
            f"which needs driver {needed} or newer: upgrade the driver, or {instead}"
        )
    return (
        f"torch {torch.__version__} (CUDA {torch_cuda}) cannot initialise CUDA with NVIDIA driver "
        f"{driver or 'of unknown version'}; `python -c 'import torch; torch.cuda.init()'` shows the reason"
    )


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a command runs on, for ``--device auto|cuda|cpu`` (or ``cuda:N``).

    ``auto`` takes CUDA when it is usable, else the CPU; on a machine that has NVIDIA devices but no usable CUDA
    (typically a driver older than the torch build needs) it says why in one warning. ``cuda`` stops with that
    reason instead of training on the CPU. Under torchrun, rank ``local_rank`` takes GPU ``local_rank % count``.

    Raises:
        UserError: for ``cuda`` where CUDA is not usable.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        if requested.startswith("cuda:"):
            if int(requested[5:]) >= torch.cuda.device_count():
                raise UserError(f"--device {requested}: this machine shows {torch.cuda.device_count()} GPU(s)")
            device = torch.device(requested)
        else:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        # The current device too: CUDA events, side streams and caching allocators take it, not the tensors'.
        torch.cuda.set_device(device)
        return device
    driver = nvidia_driver_version()
    if driver is None:
        if requested == "auto":
            return torch.device("cpu")
        raise UserError(f"--device {requested}: this machine has no NVIDIA GPU (no driver, no /dev/nvidia*)")
    reason = cuda_unusable_reason(driver, torch.version.cuda)
    if requested == "auto":
        if local_rank == 0:  # one warning per machine, not one per process
            log.warning(
                "NVIDIA GPU present but CUDA not usable, running on the CPU: %s (--device cuda to stop)", reason
            )
        return torch.device("cpu")
    raise UserError(f"--device {requested}: CUDA is not usable: {reason}")


def init_distributed(device: str = "auto") -> Runtime:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); a single process needs none.

    ``device`` is ``--device``: see :func:`resolve_device`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.startswith("cuda:"):
        raise UserError(f"--device {device} names one GPU, but torchrun started {world} processes: use --device cuda")
    device = resolve_device(device, local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    if world > 1 and device.type == "cpu":
        # Several processes share the few cores of a CPU-only machine: without this each one starts as
        # many threads as there are cores and they thrash. The cores this process may run on (a container's or
        # Slurm's CPU set), as for the data workers (config.default_workers), not the whole machine's.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Runtime(device=device, rank=rank(), local_rank=local_rank(), world_size=world)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in a single process).

    Metrics are accumulated on the CPU; NCCL only reduces CUDA tensors, so under NCCL the values make a round
    trip through the GPU (a few bytes, once per epoch).
    """
    if world_size() > 1:
        if dist.get_backend() == "nccl" and not t.is_cuda:
            buffer = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            t.copy_(buffer)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """``obj`` from every rank, in rank order (``[obj]`` in a single process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_gpu_affinity(local_rank: int) -> None:
    """Pin this process to the CPU cores nearest its GPU, as read from NVML (what DGX users expect).

    Warns instead of failing: affinity is a speed-up, never a reason to stop a run.
    """
    from common.telemetry import nvml_handle

    try:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        index = local_rank % torch.cuda.device_count()
        pynvml, handle = nvml_handle(index)
        words = pynvml.nvmlDeviceGetCpuAffinity(handle, (os.cpu_count() + 63) // 64)
        cores = {i * 64 + b for i, word in enumerate(words) for b in range(64) if (word >> b) & 1}
        os.sched_setaffinity(0, cores)
        log.info("local rank %d: CPU affinity set to %d cores near cuda:%d", local_rank, len(cores), index)
    except Exception as e:  # noqa: BLE001 - NVML missing, no GPU, containers without the capability, ...
        log.warning(
            "--gpu-affinity: could not set CPU affinity for local rank %d (%s); continuing without", local_rank, e
        )
