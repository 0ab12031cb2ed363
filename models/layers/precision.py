"""The compute dtype of the fp32-inside layers (the memory op and layers/): one upcast rule.

bf16 / fp16 inputs compute in float32 (accuracy of the reductions and exponentials); float32
and float64 compute in their own dtype. float64 stays float64 so that whole models can be
checked with `torch.autograd.gradcheck`, which needs double precision end to end.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 -> float64, anything else (float32, bf16, fp16) -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(t: Tensor, like: Tensor | None = None) -> Tensor:
    """t in the compute dtype of `like` (default: of t itself); a no-op when it already is."""
    return t.to(compute_dtype((t if like is None else like).dtype))
