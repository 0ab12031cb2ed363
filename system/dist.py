"""Process-group set-up that works the same under Ray Train, torchrun, accelerate and alone."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    launcher: str  # ray | torchrun | single


def _want_gpu(use_gpu: str) -> bool:
    if use_gpu == "true":
        if not torch.cuda.is_available():
            raise RuntimeError("scaling.use_gpu=true but no CUDA device is visible to this worker")
        return True
    return use_gpu == "auto" and torch.cuda.is_available()


def init_distributed(use_gpu: str = "auto") -> DistEnv:
    """Join the process group the launcher made, or make one from torchrun's environment."""
    gpu = _want_gpu(use_gpu)
    if dist.is_available() and dist.is_initialized():  # Ray Train made it
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        launcher = os.environ.get("MNEMO_LAUNCHER", "torchrun")
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / accelerate launch
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if world > 1:
            dist.init_process_group("nccl" if gpu else "gloo")
        launcher = "torchrun"
    else:
        rank, world, local, launcher = 0, 1, 0, "single"
    if gpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, world, local, device, launcher)


def seed_all(seed: int) -> None:
    """Python, numpy and torch RNGs from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_mean(values: list[float], world: int, device: torch.device) -> list[float]:
    """Mean of each value over ranks (one collective for the whole list)."""
    if world == 1 or not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def all_reduce_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1 or not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_lists(items: list[Any], world: int) -> list[Any]:
    """Every rank's `items`, concatenated in rank order (a collective: all ranks must call it).
    For small JSON-able records only (the pickled objects come from our own ranks)."""
    if world == 1 or not dist.is_initialized():
        return list(items)
    out: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()
