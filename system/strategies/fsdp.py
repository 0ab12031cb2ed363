"""FSDP2: `fully_shard` on every block, then on the root; optional activation checkpointing."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from system.strategies.base import Strategy, make_optimizer, make_scheduler


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks the registry names (`ModelSpec.block_attr`, default `layers`)."""
    attr = getattr(model, "block_attr", "layers")
    blocks = getattr(model, attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList {attr!r}: strategies shard and "
            "checkpoint per block"
        )
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward. DCP's state-dict helpers strip the wrapper's prefix."""
    blocks = blocks_of(model)
    for i, blk in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(blk)


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, cfg, model: nn.Module, device: torch.device, world: int, accum: int) -> None:
        super().__init__(cfg, model, device, world, accum)
        if cfg.scaling.activation_checkpointing:
            apply_activation_checkpointing(model)
        dtype = self.compute_dtype()
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for blk in blocks_of(model):
            fully_shard(blk, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        self.model = model
        self.optimizer = make_optimizer(model, cfg, device)
        self.scheduler = make_scheduler(self.optimizer, cfg)

    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager:
        # FSDP2 reduce-scatters after every backward unless told not to.
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()
