"""Triton chunkwise retention, forward and backward, under TRITON_INTERPRET=1 vs the oracle.

The interpreter is slow, so shapes are tiny but odd: lengths that no chunk divides, head dims
that are not powers of two, and a K/V tile cap of 16 so several tiles (and the summed dv
partials) are exercised. The env var must be set before ``triton.jit`` decorates the kernels,
so the fixture imports the kernel module fresh under it and drops it afterwards.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from models.ops.retention import retention, retention_recurrent, retnet_decay
from tests._testing import assert_close

B, H = 2, 3
KERNEL_MODULE = "models.ops.retention.triton"
# fp32: measured ~2e-7 (IEEE dots); bf16: inputs, state tiles and decayed operands are bf16
FP32_TOL, BF16_TOL = 1e-5, 2e-2


@pytest.fixture(scope="module")
def triton_retention():
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    sys.modules.pop(KERNEL_MODULE, None)
    module = importlib.import_module(KERNEL_MODULE)
    yield module
    sys.modules.pop(KERNEL_MODULE, None)
    patch.undo()


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """fla's conftest habit: an output element the kernels never write shows up as NaN."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def nan(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **kw: nan(new_empty(t, *a, **kw)))


def _inputs(L, K, V, *, dtype, state_cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, L, K, generator=g), torch.randn(B, H, L, K, generator=g)
    v = torch.randn(B, H, L, V, generator=g)
    h0 = torch.randn(B, H, K, state_cols, generator=g) if state_cols else None
    do = torch.randn(B, H, L, V, generator=g)
    dht = torch.randn(B, H, K, state_cols or V, generator=g)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v, h0, do, dht


def _fwd_bwd(fn, q, k, v, h0, do, dht, *, upcast: bool, **kwargs):
    """loss = <o, do> + <state, dht>; the oracle gets fp32 copies of the same rounded inputs."""
    leaves = [None if t is None else t.detach().clone() for t in (q, k, v, h0)]
    if upcast:
        leaves = [None if t is None else t.float() for t in leaves]
    leaves = [None if t is None else t.requires_grad_() for t in leaves]
    o, state = fn(*leaves[:3], retnet_decay(H), initial_state=leaves[3], **kwargs)
    ((o.float() * do).sum() + (state * dht).sum()).backward()
    out = {"o": o, "state": state}
    out.update({n: t.grad for n, t in zip(("dq", "dk", "dv", "dh0"), leaves) if t is not None})
    return out


def _check(ref, out, tol):
    assert ref.keys() == out.keys()
    for name in ref:
        assert_close(name, ref[name].float(), out[name].float(), tol)


@pytest.mark.parametrize(
    "L,K,V,chunk_size,block_kv",
    [(37, 19, 21, 16, 16), (50, 13, 11, 32, 64)],
    ids=["multi_tile", "single_tile"],
)
def test_triton_fp32_fwd_bwd_matches_reference(triton_retention, L, K, V, chunk_size, block_kv):
    q, k, v, h0, do, dht = _inputs(L, K, V, dtype=torch.float32, state_cols=V)
    ref = _fwd_bwd(retention_recurrent, q, k, v, h0, do, dht, upcast=True)
    out = _fwd_bwd(
        triton_retention.retention_triton, q, k, v, h0, do, dht, upcast=False,
        chunk_size=chunk_size, block_kv=block_kv,
    )  # fmt: skip
    _check(ref, out, FP32_TOL)


def test_triton_bf16_fwd_bwd_matches_reference(triton_retention):
    L, K, V = 37, 13, 11
    q, k, v, h0, do, dht = _inputs(L, K, V, dtype=torch.bfloat16, state_cols=V)
    ref = _fwd_bwd(retention_recurrent, q, k, v, h0, do, dht, upcast=True)
    out = _fwd_bwd(
        triton_retention.retention_triton, q, k, v, h0, do, dht, upcast=False, chunk_size=16
    )
    assert out["o"].dtype == torch.bfloat16 and out["dq"].dtype == torch.bfloat16
    assert out["state"].dtype == torch.float32
    _check(ref, out, BF16_TOL)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_triton_chunk_sweep_without_state(triton_retention, chunk_size):
    L, K, V = 45, 13, 11
    q, k, v, _, do, dht = _inputs(L, K, V, dtype=torch.float32, state_cols=0, seed=chunk_size)
    ref = _fwd_bwd(retention_recurrent, q, k, v, None, do, dht, upcast=True)
    out = _fwd_bwd(
        triton_retention.retention_triton, q, k, v, None, do, dht, upcast=False,
        chunk_size=chunk_size,
    )  # fmt: skip
    _check(ref, out, FP32_TOL)


def test_triton_dispatch_with_normalisations(triton_retention):
    """retention(impl='triton') with both RetNet normalisations, a carried state and offset."""
    L, K, V = 37, 13, 11
    q, k, v, h0, do, dht = _inputs(L, K, V, dtype=torch.float32, state_cols=V + 1)
    kw = dict(normalize_decay=True, normalize_scores=True, offset=5)
    ref = _fwd_bwd(retention_recurrent, q, k, v, h0, do, dht, upcast=True, **kw)
    out = _fwd_bwd(
        retention, q, k, v, h0, do, dht, upcast=False, impl="triton", chunk_size=16, **kw
    )
    _check(ref, out, FP32_TOL)


def test_triton_output_only_loss(triton_retention):
    """Backward with the final state unused (its incoming gradient is zeros or None)."""
    L, K, V = 21, 13, 11
    q, k, v, _, do, _ = _inputs(L, K, V, dtype=torch.float32, state_cols=0)
    grads = []
    for fn in (retention_recurrent, triton_retention.retention_triton):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, _ = fn(*leaves, retnet_decay(H))
        (o * do).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, r, t in zip(("dq", "dk", "dv"), *grads):
        assert_close(name, r, t, FP32_TOL)


def test_triton_rejects_bad_chunk(triton_retention):
    q, k, v, _, _, _ = _inputs(8, 13, 11, dtype=torch.float32, state_cols=0)
    with pytest.raises(ValueError, match="chunk_size"):
        triton_retention.retention_triton(q, k, v, retnet_decay(H), chunk_size=24)
