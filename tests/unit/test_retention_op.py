"""Retention forms (parallel, chunked, dispatch) vs the recurrent fp32 oracle.

fla-style: fixed seeds, odd lengths and head dims, a chunk-size sweep, outputs, final states
and every gradient (q, k, v, initial state) compared by relative RMS.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from models.ops.retention import (
    decay_row_sums,
    retention,
    retention_chunked,
    retention_parallel,
    retention_recurrent,
    retention_step,
    retnet_decay,
)
from tests._testing import assert_close

B, H, K, V = 2, 3, 13, 21
NORMS = list(itertools.product([False, True], [False, True]))  # (normalize_decay, _scores)
# fp32 forms differ only in summation order: ~2e-7 measured
TOL = {"o": 1e-5, "state": 1e-5, "dq": 1e-5, "dk": 1e-5, "dv": 1e-5, "dh0": 1e-5}


def _inputs(L: int, *, with_state: bool, normalize_scores: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, K, generator=g)
    k = torch.randn(B, H, L, K, generator=g)
    v = torch.randn(B, H, L, V, generator=g)
    h0 = torch.randn(B, H, K, V + normalize_scores, generator=g) if with_state else None
    do = torch.randn(B, H, L, V, generator=g)
    dht = torch.randn(B, H, K, V + normalize_scores, generator=g)
    return q, k, v, h0, do, dht


def _run(fn, q, k, v, h0, do, dht, **kwargs) -> dict[str, torch.Tensor]:
    """Forward + backward of loss = <o, do> + <state, dht>; returns outputs and gradients."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, h0)]
    o, state = fn(*leaves[:3], retnet_decay(H), initial_state=leaves[3], **kwargs)
    ((o.float() * do).sum() + (state * dht).sum()).backward()
    out = {"o": o.detach(), "state": state.detach()}
    for name, leaf in zip(("dq", "dk", "dv", "dh0"), leaves):
        if leaf is not None:
            out[name] = leaf.grad
    return out


def _compare(ref: dict, out: dict, tol: dict = TOL) -> None:
    assert ref.keys() == out.keys()
    for name in ref:
        assert_close(name, ref[name], out[name], tol[name])


def test_retnet_decay_and_row_sums():
    gamma = retnet_decay(4)
    expected = torch.tensor([1 - 2.0**-5, 1 - 2.0**-6, 1 - 2.0**-7, 1 - 2.0**-8])
    torch.testing.assert_close(gamma, expected)
    pos = torch.tensor([0, 1, 7, 40])
    c = decay_row_sums(torch.log(gamma), pos)
    explicit = torch.stack([(gamma[:, None] ** torch.arange(p + 1)).sum(-1) for p in pos], -1)
    torch.testing.assert_close(c, explicit)
    # gamma = 1 (no decay) falls back to the plain count
    torch.testing.assert_close(decay_row_sums(torch.zeros(1), pos)[0], (pos + 1).float())


@pytest.mark.parametrize("L", [63, 100])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("normalize_decay,normalize_scores", NORMS)
def test_parallel_matches_recurrent(L, with_state, normalize_decay, normalize_scores):
    q, k, v, h0, do, dht = _inputs(L, with_state=with_state, normalize_scores=normalize_scores)
    kw = dict(normalize_decay=normalize_decay, normalize_scores=normalize_scores, offset=7)
    ref = _run(retention_recurrent, q, k, v, h0, do, dht, **kw)
    out = _run(retention_parallel, q, k, v, h0, do, dht, **kw)
    _compare(ref, out)


@pytest.mark.parametrize("L", [63, 100, 200])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunked_matches_recurrent_chunk_sweep(L, chunk_size):
    q, k, v, h0, do, dht = _inputs(L, with_state=True, normalize_scores=False, seed=L)
    ref = _run(retention_recurrent, q, k, v, h0, do, dht)
    out = _run(retention_chunked, q, k, v, h0, do, dht, chunk_size=chunk_size)
    _compare(ref, out)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("normalize_decay,normalize_scores", NORMS)
def test_chunked_normalised_matches_recurrent(with_state, normalize_decay, normalize_scores):
    L = 100
    q, k, v, h0, do, dht = _inputs(L, with_state=with_state, normalize_scores=normalize_scores)
    kw = dict(normalize_decay=normalize_decay, normalize_scores=normalize_scores, offset=3)
    ref = _run(retention_recurrent, q, k, v, h0, do, dht, **kw)
    out = _run(retention_chunked, q, k, v, h0, do, dht, chunk_size=32, **kw)
    _compare(ref, out)


def test_parallel_normalised_matches_torchscale_formula():
    """Same numbers as torchscale's parallel form: mask / sqrt(row sum), then |row sum| >= 1."""
    L = 63
    q, k, v, _, _, _ = _inputs(L, with_state=False, normalize_scores=False)
    gamma = retnet_decay(H)
    idx = torch.arange(L)
    rel = (idx[:, None] - idx[None, :]).float()
    mask = torch.where(rel >= 0, gamma.view(H, 1, 1) ** rel.clamp(min=0), torch.zeros(()))
    mask = mask / mask.sum(-1, keepdim=True).sqrt()
    qk = (q * K**-0.5) @ k.transpose(-1, -2) * mask
    qk = qk / qk.sum(-1, keepdim=True).abs().clamp(min=1)
    expected = qk @ v
    o, _ = retention_parallel(q, k, v, gamma, normalize_decay=True, normalize_scores=True)
    assert_close("o", expected, o, 1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_streaming_equals_whole(normalize):
    """Feeding 100 tokens as 37 + 63 with the carried state and offset gives the same output."""
    L, cut = 100, 37
    q, k, v, h0, _, _ = _inputs(L, with_state=True, normalize_scores=normalize)
    kw = dict(normalize_decay=normalize, normalize_scores=normalize, chunk_size=16)
    gamma = retnet_decay(H)
    o_all, s_all = retention_chunked(q, k, v, gamma, initial_state=h0, **kw)
    o1, s1 = retention_chunked(
        q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], gamma, initial_state=h0, **kw
    )
    o2, s2 = retention_chunked(
        q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], gamma, initial_state=s1, offset=cut, **kw
    )
    assert_close("o", o_all, torch.cat([o1, o2], dim=2), 1e-5)
    assert_close("state", s_all, s2, 1e-5)


@pytest.mark.parametrize("normalize_decay,normalize_scores", NORMS)
def test_recurrent_decode_equals_parallel(normalize_decay, normalize_scores):
    """One-token decoding through retention(impl='recurrent') reproduces the parallel form."""
    L = 63
    q, k, v, _, _, _ = _inputs(L, with_state=False, normalize_scores=normalize_scores)
    gamma = retnet_decay(H)
    kw = dict(normalize_decay=normalize_decay, normalize_scores=normalize_scores)
    o_par, s_par = retention(q, k, v, gamma, impl="parallel", **kw)
    state, outs = None, []
    for t in range(L):
        sl = slice(t, t + 1)
        o_t, state = retention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], gamma, impl="recurrent",
            initial_state=state, offset=t, **kw,
        )  # fmt: skip
        outs.append(o_t)
    assert_close("o", o_par, torch.cat(outs, dim=2), 1e-5)
    assert_close("state", s_par, state, 1e-5)


@pytest.mark.parametrize("normalize_decay,normalize_scores", NORMS)
def test_decoding_step_is_the_oracle_step_bitwise(normalize_decay, normalize_scores):
    """retention_step (RetNet's decoding, apart from the oracle) == one token of the oracle's
    loop, bitwise, at every step: outputs, states and their gradients (through the carried
    state, from a learned initial state on)."""
    L = 9
    q, k, v, h0, _, _ = _inputs(L, with_state=True, normalize_scores=normalize_scores)
    gamma = retnet_decay(H)
    kw = dict(normalize_decay=normalize_decay, normalize_scores=normalize_scores)
    grads = []
    for fn in (retention_recurrent, retention_step):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, h0)]
        state, outs, states = leaves[3], [], []
        for t in range(L):
            sl = slice(t, t + 1)
            qt, kt, vt = (x[:, :, sl] for x in leaves[:3])
            o_t, state = fn(qt, kt, vt, gamma, initial_state=state, offset=t, **kw)
            outs.append(o_t)
            states.append(state)
        torch.cat(outs, dim=2).square().sum().add(state.sum()).backward()
        grads.append((outs, states, [x.grad for x in leaves]))
    (o_ref, s_ref, g_ref), (o_new, s_new, g_new) = grads
    for a, b in zip(o_ref + s_ref + g_ref, o_new + s_new + g_new):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one token"):
        retention_step(q, k, v, gamma, initial_state=h0, **kw)


def test_mode_is_the_deprecated_name_of_impl():
    """retention(mode=...) still runs the form it names (benchmarks pass it), with a
    DeprecationWarning; a mode that contradicts an explicit impl is refused."""
    q, k, v, h0, _, _ = _inputs(21, with_state=True, normalize_scores=False)
    gamma = retnet_decay(H)
    o, s = retention(q, k, v, gamma, impl="parallel", initial_state=h0)
    with pytest.warns(DeprecationWarning, match="impl="):
        o_old, s_old = retention(q, k, v, gamma, mode="parallel", initial_state=h0)
    assert torch.equal(o, o_old) and torch.equal(s, s_old)
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        retention(q, k, v, gamma, impl="chunked", mode="parallel")


@pytest.mark.parametrize("L", [1, 5, 63])
def test_chunk_larger_than_sequence(L):
    q, k, v, h0, do, dht = _inputs(L, with_state=True, normalize_scores=False)
    ref = _run(retention_recurrent, q, k, v, h0, do, dht)
    out = _run(retention_chunked, q, k, v, h0, do, dht, chunk_size=64)
    _compare(ref, out)


def test_chunked_bf16_inputs():
    """bf16 in, bf16 out, fp32 state; error at bf16 rounding level of the fp32 oracle."""
    L = 100
    q, k, v, h0, _, _ = _inputs(L, with_state=True, normalize_scores=False)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    o, state = retention_chunked(q, k, v, retnet_decay(H), initial_state=h0, chunk_size=32)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o_ref, s_ref = retention_recurrent(
        q.float(), k.float(), v.float(), retnet_decay(H), initial_state=h0
    )
    assert_close("o", o_ref, o, 1e-2)
    assert_close("state", s_ref, state, 1e-5)


def test_scale_is_applied_to_scores_not_state():
    L = 20
    q, k, v, _, _, _ = _inputs(L, with_state=False, normalize_scores=False)
    gamma = retnet_decay(H)
    o1, s1 = retention_chunked(q, k, v, gamma, scale=1.0, chunk_size=16)
    o2, s2 = retention_chunked(q, k, v, gamma, chunk_size=16)
    assert_close("o", o1 / math.sqrt(K), o2, 1e-6)
    assert_close("state", s1, s2, 1e-7)


def test_dispatch_modes_and_errors(monkeypatch):
    L = 45
    q, k, v, h0, _, _ = _inputs(L, with_state=True, normalize_scores=False)
    gamma = retnet_decay(H)
    ref_o, ref_s = retention_recurrent(q, k, v, gamma, initial_state=h0)
    for mode in ("auto", "chunked", "parallel", "recurrent"):
        o, s = retention(q, k, v, gamma, impl=mode, initial_state=h0, chunk_size=16)
        assert_close(f"o[{mode}]", ref_o, o, 1e-5)
        assert_close(f"state[{mode}]", ref_s, s, 1e-5)
    with pytest.raises(ValueError, match="impl"):
        retention(q, k, v, gamma, impl="flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        retention(q, k, v, gamma, impl="triton")
    with pytest.raises(ValueError, match="initial_state"):
        retention(q, k, v, gamma, initial_state=h0, normalize_scores=True)
    with pytest.raises(ValueError, match="decay"):
        retention(q, k, v, gamma[:2])
    with pytest.raises(ValueError, match="v must be"):
        retention(q, k, v[:, :, :-1], gamma)


@pytest.mark.parametrize("form", [retention_recurrent, retention_chunked, retention_parallel])
def test_forms_keep_the_inputs_device(form):
    """Every tensor each form builds lives on the inputs' device, with a carried offset too:
    on the meta device a tensor made on the default (CPU) device fails as it would on a GPU,
    where CI does not run."""
    meta = torch.device("meta")
    q, k, v, h0, _, _ = _inputs(9, with_state=True, normalize_scores=True)
    q, k, v, h0 = (t.to(meta) for t in (q, k, v, h0))
    kw = {"chunk_size": 4} if form is retention_chunked else {}
    o, state = form(
        q,
        k,
        v,
        retnet_decay(H).to(meta),
        initial_state=h0,
        offset=3,
        normalize_decay=True,
        normalize_scores=True,
        **kw,
    )
    assert (o.device, state.device) == (meta, meta)
