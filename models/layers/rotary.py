"""Rotary position embedding (RoPE), with a position offset so cached decoding matches."""

from __future__ import annotations

import torch

from models.layers.precision import upcast


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (L, head_dim // 2) for integer `positions` (L,)."""
    inv = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    )
    ang = positions.float()[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x_BHLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position's angle; computed in fp32 (float64 kept)."""
    x = upcast(x_BHLD)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    return torch.stack((y1, y2), dim=-1).flatten(-2).to(x_BHLD.dtype)
