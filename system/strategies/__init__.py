"""Distributed strategies behind one small interface (see base.Strategy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from system.strategies.base import Strategy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from system.config import JobConfig


def build_strategy(
    cfg: JobConfig, model: nn.Module, device: torch.device, world: int, accum: int
) -> Strategy:
    """Wrap `model` (already on `device`, same init on every rank) for `cfg.scaling.strategy`."""
    name = cfg.scaling.strategy
    if name == "ddp":
        from system.strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, model, device, world, accum)
    if name == "fsdp":
        from system.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, model, device, world, accum)
    if name == "deepspeed":
        from system.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, model, device, world, accum)
    raise ValueError(f"scaling.strategy={name!r} is unknown; expected ddp, fsdp or deepspeed")


__all__ = ["Strategy", "build_strategy"]
