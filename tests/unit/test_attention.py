"""Attention dispatch: every SDPA path against the plain fp32 reference; backend forcing."""

from __future__ import annotations

import pytest
import torch

from models.layers import attention as A
from tests._testing import assert_close

TOL = 1e-5  # fp32, same math in another order


def _qkv(b=2, h=4, hkv=2, lq=37, lk=37, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q, k, v


@pytest.mark.parametrize(
    "lq,lk,window,prefix",
    [
        (37, 37, None, 0),
        (5, 37, None, 0),
        (37, 37, 8, 0),
        (37, 41, 8, 4),
        (100, 100, 16, 0),
        (100, 104, 16, 4),
        (1, 50, 8, 0),
    ],
)
def test_sdpa_matches_reference(lq, lk, window, prefix):
    q, k, v = _qkv(lq=lq, lk=lk)
    out = A.attention(q, k, v, causal=True, window=window, prefix=prefix, backend="sdpa")
    mask = A.attention_mask(lq, lk - prefix, q_offset=lk - prefix - lq, window=window)
    if prefix:
        mask = torch.cat([torch.ones(lq, prefix, dtype=torch.bool), mask], dim=1)
    ref = A.reference_attention(q, k, v, mask)
    assert_close("attention", ref, out, TOL)


def test_windowed_path_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(lq=70, lk=70))
    out = A.attention(q, k, v, window=8, backend="sdpa")  # blockwise path (70 > 2 * 8)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = A.reference_attention(*ref_in, A.attention_mask(70, 70, window=8))
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for name, a, b in zip("qkv", ref_in, (q, k, v)):
        assert_close(f"d{name}", a.grad, b.grad, TOL)


def test_mask_semantics():
    m = A.attention_mask(3, 5, q_offset=2, window=2)
    # query 0 sits at position 2: sees positions 1, 2 only
    assert m.tolist()[0] == [False, True, True, False, False]
    assert m.tolist()[2] == [False, False, False, True, True]


def test_backend_forcing():
    q, k, v = _qkv()
    assert A.resolve_backend(q) == "sdpa"  # CPU: flash never chosen automatically
    with pytest.raises(RuntimeError, match="'flash' was forced but cannot run here"):
        A.attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="unknown; expected one of"):
        A.set_backend("xformers")
    A.set_backend("sdpa")
    try:
        assert A.get_backend() == "sdpa"
        assert A.resolve_backend(q) == "sdpa"
    finally:
        A.set_backend("auto")


@pytest.mark.gpu
def test_flash_matches_sdpa_on_gpu():
    q, k, v = (t.cuda().bfloat16() for t in _qkv(h=4, hkv=4, lq=256, lk=256, d=64))
    for window in (None, 64):
        f = A.attention(q, k, v, window=window, backend="flash")
        s = A.attention(q, k, v, window=window, backend="sdpa")
        assert_close("flash vs sdpa", s.float(), f.float(), 2e-2)
