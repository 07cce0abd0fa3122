"""Distributed set-up from torchrun's environment, and small pure helpers around it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


def init_distributed() -> Runtime:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); a single process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    if world > 1 and device.type == "cpu":
        # Several processes share the few cores of a CPU-only machine: without this each one starts as
        # many threads as there are cores and they thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
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
