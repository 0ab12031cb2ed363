"""The interface every strategy implements, plus the optimizer and schedule they share.

A training step is `accum` micro-steps: for each, `with s.accumulate(is_last): loss = ...` then
`s.micro_step(loss, is_last)`; the last one clips, steps the optimizer and the LR schedule and
returns the gradient norm. `loss` is the mean over the micro-batch; strategies scale it by
1/accum themselves (DeepSpeed does so inside its engine).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from system.config import JobConfig


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to `min_ratio` at `total` steps (then flat)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; norms, biases and gains are not decayed (GPT-2 / LLaMA habit)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: JobConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel on CUDA, the foreach one elsewhere."""
    o = cfg.optim
    kwargs: dict[str, Any] = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kwargs
    )


def make_scheduler(opt: torch.optim.Optimizer, cfg: JobConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    fn = lambda s: lr_lambda(  # noqa: E731
        s, warmup=o.warmup_steps, total=cfg.train.steps, min_ratio=o.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


class Strategy:
    """Owns the wrapped model, optimizer and LR schedule of one rank."""

    name = "base"

    def __init__(
        self, cfg: JobConfig, model: nn.Module, device: torch.device, world: int, accum: int
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.world = world
        self.accum = accum
        self.module = model  # the unwrapped module (checkpoint keys, eval)
        self.model: nn.Module = model  # what the loop calls
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for a micro-step's forward and backward (skip gradient sync unless last)."""
        return contextlib.nullcontext()

    def micro_step(self, loss: torch.Tensor, is_last: bool) -> float | None:
        """Backward of one micro-batch; on the last one also clip + step. Returns grad norm."""
        (loss / self.accum).backward()
        if not is_last:
            return None
        norm = self._clip()
        assert self.optimizer is not None and self.scheduler is not None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _clip(self) -> float:
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def lr(self) -> float:
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[0]["lr"])

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on GPU (unless the strategy casts parameters itself), fp32 on CPU."""
        if self.compute_dtype() == torch.bfloat16 and self.name == "ddp":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute_dtype(self) -> torch.dtype:
        d = self.cfg.train.dtype
        if d == "bf16" or (d == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return torch.float32
