"""DistributedDataParallel (or the plain module on one process)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from system.strategies.base import Strategy, make_optimizer, make_scheduler
from system.strategies.fsdp import apply_activation_checkpointing


class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(self, cfg, model: nn.Module, device: torch.device, world: int, accum: int) -> None:
        super().__init__(cfg, model, device, world, accum)
        if cfg.scaling.activation_checkpointing:
            apply_activation_checkpointing(model)
        if world > 1 and dist.is_initialized():
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        self.optimizer = make_optimizer(model, cfg, device)
        self.scheduler = make_scheduler(self.optimizer, cfg)

    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager:
        if isinstance(self.model, DistributedDataParallel) and not is_last:
            return self.model.no_sync()
        return contextlib.nullcontext()
