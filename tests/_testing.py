"""Shared test helpers: relative-RMS comparison as fla's tests use it (STYLE.md habit 3)."""

from __future__ import annotations

import torch


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """RMS of the difference divided by the RMS of the reference (0 when both are zero)."""
    ref = ref.detach().double()
    out = out.detach().double()
    diff = (ref - out).pow(2).mean().sqrt()
    base = ref.pow(2).mean().sqrt()
    if base == 0:
        return float(diff)
    return float(diff / base)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    """Fail with the tensor's name and the measured error when rel-RMS exceeds `tol`."""
    assert ref.shape == out.shape, (
        f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    )
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_rms(ref, out)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > tolerance {tol:.1e}"
