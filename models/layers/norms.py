"""Normalisation layers shared by the model families."""

from __future__ import annotations

import torch
from torch import nn

from models.layers.precision import upcast


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) computed in fp32 for stability under bf16 autocast
    (float64 stays float64: `models.layers.precision`)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * upcast(self.weight, xf)).to(x.dtype)
