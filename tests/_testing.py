"""Shared test helpers: relative-RMS comparison as fla's tests use it (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a module of tiny ops: on the shared 2-core box OpenMP wake-ups make two
    threads far slower than one (measured ~30x), so the module runs on one thread."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def autograd_graph_size(t: torch.Tensor) -> int:
    """Autograd nodes reachable from t.grad_fn (what forward keeps alive for backward)."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo.extend(g for g, _ in f.next_functions)
    return len(seen)


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
