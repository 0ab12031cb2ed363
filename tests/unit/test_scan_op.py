"""Parallel prefix scans vs their sequential references: linear recurrence and Aaren's (m, u, w).

Fixed seeds, odd lengths, (B, L, D) and (B, H, L, D) layouts, outputs and every gradient.
"""

from __future__ import annotations

import pytest
import torch

from models.ops.scan import (
    AarenState,
    aaren_scan,
    aaren_scan_reference,
    aaren_step,
    linear_scan,
    linear_scan_reference,
)
from tests._testing import assert_close

D = 13
LAYOUTS = {"BLD": (2,), "BHLD": (2, 3)}  # leading dims before (L, D)
TOL = 1e-5  # fp32; measured <= 1e-6


def _grads(fn, tensors, cotangent):
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * cotangent).sum().backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _linear_inputs(lead, L, *, kind, with_h0, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, L, D, generator=g)
    if kind == "decay":
        a = torch.sigmoid(torch.randn(*lead, L, D, generator=g) + 2.0)
    else:  # signed gates with exact resets a_t = 0
        a = torch.randn(*lead, L, D, generator=g).clamp(-1.2, 1.2)
        a = a.masked_fill(torch.rand(*lead, L, D, generator=g) < 0.1, 0.0)
    h0 = torch.randn(*lead, D, generator=g) if with_h0 else None
    return a, x, h0, torch.randn(*lead, L, D, generator=g)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("L", [63, 100, 200])
@pytest.mark.parametrize("kind", ["decay", "signed_with_resets"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_scan_matches_reference(layout, L, kind, with_h0):
    a, x, h0, dh = _linear_inputs(LAYOUTS[layout], L, kind=kind, with_h0=with_h0, seed=L)
    ref, ref_grads = _grads(linear_scan_reference, (a, x, h0), dh)
    out, out_grads = _grads(linear_scan, (a, x, h0), dh)
    assert_close("h", ref, out, TOL)
    for name, r, o in zip(("da", "dx", "dh0"), ref_grads, out_grads):
        if r is not None:
            assert_close(name, r, o, TOL)


def test_linear_scan_reset_and_dtype():
    """a_t = 0 restarts the recurrence exactly; bf16 in gives bf16 out."""
    a = torch.full((1, 9, 2), 0.5)
    a[:, 4] = 0.0
    x = torch.ones(1, 9, 2)
    h = linear_scan(a, x, h0=torch.full((1, 2), 100.0))
    torch.testing.assert_close(h[:, 4], torch.ones(1, 2))
    torch.testing.assert_close(h[:, 5:], linear_scan(a[:, 5:], x[:, 5:], h0=h[:, 4]))
    assert linear_scan(a.bfloat16(), x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="h0"):
        linear_scan(a, x, h0=torch.zeros(1, 3))


def _aaren_inputs(lead, L, seed, score_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, L, generator=g) * score_scale
    v = torch.randn(*lead, L, D, generator=g)
    return s, v, torch.randn(*lead, L, D, generator=g)


def _dense_prefix_softmax(s, v):
    L = s.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    logits = s[..., None, :].expand(*s.shape[:-1], L, L).masked_fill(~causal, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("L", [63, 100, 200])
def test_aaren_scan_matches_reference_and_softmax(layout, L):
    s, v, do = _aaren_inputs(LAYOUTS[layout], L, seed=L)
    ref, ref_grads = _grads(lambda s, v: aaren_scan_reference(s, v)[0], (s, v), do)
    out, out_grads = _grads(lambda s, v: aaren_scan(s, v)[0], (s, v), do)
    assert_close("o", ref, out, TOL)
    assert_close("o_dense", _dense_prefix_softmax(s, v), out, TOL)
    for name, r, o in zip(("ds", "dv"), ref_grads, out_grads):
        assert_close(name, r, o, TOL)
    _, ref_state = aaren_scan_reference(s, v)
    _, state = aaren_scan(s, v)
    for name, r, o in zip("muw", ref_state, state):
        assert_close(name, r, o, TOL)


def test_aaren_stable_for_large_scores():
    s, v, _ = _aaren_inputs((2, 3), 100, seed=1, score_scale=1000.0)
    out, _ = aaren_scan(s, v)
    assert_close("o", _dense_prefix_softmax(s, v), out, TOL)


def test_aaren_chunks_with_state_and_grads():
    """Scanning 100 tokens as 41 + 59 through the carried state equals one scan, grads too."""
    s, v, do = _aaren_inputs((2, 3), 100, seed=7)
    cut = 41

    def chunked(s, v):
        o1, state = aaren_scan(s[..., :cut], v[..., :cut, :])
        o2, _ = aaren_scan(s[..., cut:], v[..., cut:, :], initial_state=state)
        return torch.cat([o1, o2], dim=-2)

    def whole(s, v):
        return aaren_scan_reference(s, v)[0]

    ref, ref_grads = _grads(whole, (s, v), do)
    out, out_grads = _grads(chunked, (s, v), do)
    assert_close("o", ref, out, TOL)
    for name, r, o in zip(("ds", "dv"), ref_grads, out_grads):
        assert_close(name, r, o, TOL)


def test_aaren_initial_state_grads_match_reference():
    s, v, do = _aaren_inputs((2, 3), 63, seed=3)
    g = torch.Generator().manual_seed(4)
    m0, u0 = torch.randn(2, 3, generator=g), torch.rand(2, 3, generator=g) + 0.5
    w0 = torch.randn(2, 3, D, generator=g)
    ref, ref_grads = _grads(
        lambda s, v, m0, u0, w0: aaren_scan_reference(s, v, (m0, u0, w0))[0], (s, v, m0, u0, w0), do
    )
    out, out_grads = _grads(
        lambda s, v, m0, u0, w0: aaren_scan(s, v, AarenState(m0, u0, w0))[0], (s, v, m0, u0, w0), do
    )
    assert_close("o", ref, out, TOL)
    for name, r, o in zip(("ds", "dv", "dm0", "du0", "dw0"), ref_grads, out_grads):
        assert_close(name, r, o, TOL)


def test_aaren_step_equals_scan():
    s, v, _ = _aaren_inputs((2, 3), 63, seed=5)
    o_scan, final = aaren_scan(s, v)
    state, outs = None, []
    for t in range(s.shape[-1]):
        o_t, state = aaren_step(state, s[..., t], v[..., t, :])
        outs.append(o_t)
    assert_close("o", o_scan, torch.stack(outs, dim=-2), TOL)
    for name, r, o in zip("muw", final, state):
        assert_close(name, r, o, TOL)


def test_aaren_ignores_minus_inf_scores():
    s, v, do = _aaren_inputs((2,), 63, seed=6)
    s = s.masked_fill(
        torch.rand(s.shape, generator=torch.Generator().manual_seed(0)) < 0.3, float("-inf")
    )
    s[..., 0] = 0.0  # the first prefix must hold a token
    ref = _dense_prefix_softmax(s, v)
    out, (ds, dv) = _grads(lambda s, v: aaren_scan(s, v)[0], (s, v), do)
    assert_close("o", ref, out, TOL)
    assert_close("o_ref", aaren_scan_reference(s, v)[0], out, TOL)
    assert torch.isfinite(ds).all() and torch.isfinite(dv).all()
    assert (ds[torch.isneginf(s)] == 0).all()
