"""checkpointed_scan (models/layers/segment_scan.py) == the plain segment loop: outputs and
every gradient (input, initial state, final state, parameters), also inside an enclosing
activation checkpoint, which must not rerun the scan."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers.segment_scan import checkpointed_scan
from tests._testing import assert_close, autograd_graph_size

B, L, D, SEG = 2, 50, 8, 16  # odd length: the last segment is partial


class _Recurrent(nn.Module):
    """A small nonlinear segment step with two state tensors and parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.u = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.h0 = nn.Parameter(torch.randn(D))
        self.calls = 0

    def step(self, x_j: torch.Tensor, st: list[torch.Tensor]):
        self.calls += 1
        h, c = st
        y = torch.tanh(x_j @ self.w + h[:, None]) * c[:, None]
        return y, [0.9 * h + y.mean(1) @ self.u, c.sigmoid() + y.square().mean(1)]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)


def _loop(m: _Recurrent, x: torch.Tensor, st: list[torch.Tensor]):
    ys = []
    for s in range(0, x.shape[1], SEG):
        y, st = m.step(x[:, s : s + SEG], st)
        ys.append(y)
    return torch.cat(ys, dim=1), st


def _grads(run, enclose: bool = False):
    torch.manual_seed(0)
    m = _Recurrent()
    x, r = _inputs()
    x.requires_grad_(True)
    c0 = torch.rand(B, D, requires_grad=True)

    def f(x):
        y, (h, c) = run(m, x, [m.h0.expand(B, D), c0])
        return y, h, c

    # Enclosed as TitansBlock is by block-level activation checkpointing (nothing else saved).
    y, h, c = checkpoint(f, x, use_reentrant=False) if enclose else f(x)
    loss = (y * r).sum() + h.square().sum() + c.sum()
    loss.backward()
    grads = {"x": x.grad, "c0": c0.grad, **{n: p.grad for n, p in m.named_parameters()}}
    return loss.detach(), grads, m.calls


def _scan(m: _Recurrent, x: torch.Tensor, st: list[torch.Tensor]):
    return checkpointed_scan(m.step, x, st, list(m.parameters()), SEG)


@pytest.mark.parametrize("enclose", [False, True])
def test_scan_matches_loop(enclose: bool) -> None:
    ref_loss, ref, _ = _grads(_loop)
    loss, got, calls = _grads(_scan, enclose)
    assert torch.equal(ref_loss, loss)  # forward runs the same ops in the same order
    for name, g in ref.items():
        assert got[name] is not None, name
        assert_close(f"grad {name}", g, got[name], 1e-6)
    n = -(-L // SEG)
    assert calls == 2 * n, f"step ran {calls} times, expected {2 * n} (forward + one recompute)"


def test_forward_keeps_no_graph() -> None:
    """The graph kept after forward does not grow with the length (the loop's does)."""
    m = _Recurrent()
    sizes = {}
    for run in (_loop, _scan):
        for n in (L, 4 * L):
            x = torch.randn(B, n, D, requires_grad=True)
            y, _ = run(m, x, [m.h0.expand(B, D), torch.rand(B, D)])
            sizes[run.__name__, n] = autograd_graph_size(y)
    assert sizes["_scan", L] == sizes["_scan", 4 * L] < sizes["_loop", L] < sizes["_loop", 4 * L]


def test_no_grad_and_inplace_errors() -> None:
    m = _Recurrent()
    x, _ = _inputs()
    st = [m.h0.expand(B, D), torch.rand(B, D)]
    with torch.no_grad():
        y0, s0 = _loop(m, x, st)
        y1, s1 = _scan(m, x, st)
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(s0, s1))
    x = x.clone().requires_grad_(True)
    xx = x * 1.0
    y, _ = _scan(m, xx, st)
    xx.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()
    with pytest.raises(ValueError, match="seg"):
        checkpointed_scan(m.step, x, st, [], 0)


def test_backward_replays_autocast() -> None:
    """Backward recomputes under the forward's autocast (bf16 matmuls), not in fp32.

    The reference enters autocast per segment: one autocast region would share one bf16 copy
    of each weight between segments and sum their gradients in bf16, where the scan sums the
    per-segment gradients in fp32.
    """

    def loop(m, x, st):
        ys = []
        for s in range(0, x.shape[1], SEG):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y, st = m.step(x[:, s : s + SEG], st)
            ys.append(y)
        return torch.cat(ys, dim=1), st

    def scan(m, x, st):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _scan(m, x, st)

    res = []
    for run in (loop, scan):
        torch.manual_seed(0)
        m = _Recurrent()
        x, r = _inputs()
        y, _ = run(m, x, [m.h0.expand(B, D), torch.rand(B, D)])
        (y.float() * r).sum().backward()
        res.append(m.w.grad)
    assert_close("grad w under autocast", res[0], res[1], 1e-6)


def _write_only_step(m: _Recurrent):
    def step(x_j, st):
        y, (h, _) = m.step(x_j, [st[0], torch.ones_like(st[0])])
        return y, [h, y.mean(1)]  # st[1] is overwritten, never read

    return step


def test_state_never_read() -> None:
    """A state tensor that the step writes but never reads gets no gradient between segments."""
    res = []
    for scan in (False, True):
        torch.manual_seed(0)
        m = _Recurrent()
        step = _write_only_step(m)
        x, r = _inputs()
        st = [m.h0.expand(B, D), torch.zeros(B, D, requires_grad=True)]
        if scan:
            y, st = checkpointed_scan(step, x, st, list(m.parameters()), SEG)
        else:
            ys = []
            for s in range(0, L, SEG):
                y, st = step(x[:, s : s + SEG], st)
                ys.append(y)
            y = torch.cat(ys, dim=1)
        ((y * r).sum() + st[1].sum()).backward()
        res.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in res[0].items():
        assert_close(f"grad {name}", g, res[1][name], 1e-6)
