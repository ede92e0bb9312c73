"""Distributed training set-up: the rank and device of a process under ``torchrun``, the process
group, the DDP wrapper and the reduction of per-rank metrics."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["dist_info", "init_distributed", "wrap_ddp", "all_reduce_mean", "device_for_rank"]


def dist_info() -> tuple[int, int]:
    """(rank, world_size): from torchrun's environment, (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(world_size: int, device: torch.device) -> None:
    """Joins the process group (NCCL on CUDA, gloo on CPU) when there is more than one rank."""
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def wrap_ddp(core: nn.Module, device: torch.device) -> nn.Module:
    """``core`` wrapped in DistributedDataParallel (gradients averaged over the ranks)."""
    return nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=True)


def all_reduce_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    """The mean over the ranks of each of ``values`` (every rank passes the same keys in the same order)."""
    if world_size == 1 or not values:
        return values
    buf = torch.tensor(list(values.values()), dtype=torch.float64)  # same keys, same order on every rank
    dist.all_reduce(buf)
    return {k: float(v) / world_size for k, v in zip(values, buf)}


def device_for_rank() -> torch.device:
    """The device of this process: its GPU (LOCAL_RANK under torchrun) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
