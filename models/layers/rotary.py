"""Rotary position embedding (RoPE), with a position offset so cached decoding matches.

Two frequency schedules for rotary pair i of a K-wide head (i = 0 .. K/2 - 1):
- "llama" (RoFormer / Llama; `rope_angles`' default, every model but RetNet): theta^(-2i / K).
- "torchscale" (RetNet's official code, torchscale 0.3.0 `RetNetRelPos`):
  theta^(-i / (K/2 - 1)), i.e. `1 / theta ** linspace(0, 1, K // 2)`, last pair exactly 1/theta.
Both rotate the interleaved pairs (x[2i], x[2i+1]), as torchscale's `theta_shift`
(`rotate_every_two` on angles repeated pairwise) does.
"""

from __future__ import annotations

import torch

from models.layers.precision import upcast

ROPE_SCHEDULES = ("llama", "torchscale")


def rope_inv_freq(
    head_dim: int,
    theta: float = 10000.0,
    schedule: str = "llama",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Angle per position of each rotary pair, shape (head_dim // 2,), fp32."""
    if schedule == "llama":
        exponent = torch.arange(0, head_dim, 2, device=device).float() / head_dim
    elif schedule == "torchscale":
        exponent = torch.linspace(0, 1, head_dim // 2, device=device)
    else:
        raise ValueError(f"rotary schedule={schedule!r} must be one of {ROPE_SCHEDULES}")
    return 1.0 / (theta**exponent)


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, schedule: str = "llama"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (L, head_dim // 2) for integer `positions` (L,)."""
    inv = rope_inv_freq(head_dim, theta, schedule, positions.device)
    ang = positions.float()[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x_BHLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position's angle; computed in fp32 (float64 kept)."""
    x = upcast(x_BHLD)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    return torch.stack((y1, y2), dim=-1).flatten(-2).to(x_BHLD.dtype)
