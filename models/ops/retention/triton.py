"""Chunkwise RetNet retention in Triton, forward and backward (fp32 and bf16).

Legend: B batch, H heads, T tokens, NT chunks, BT chunk size, K/V head dims, BK/BV their tiles.
Five kernels, the layout fla's chunk kernels use:
  fwd_h   per (K tile, V tile, b*h): walk the chunks, store the state h_n *before* chunk n
  fwd_o   per (V tile, chunk, b*h):  o = scale (q h_n) * xi + (scale q k^T * D) v
  bwd_dh  per (K tile, V tile, b*h): walk the chunks backwards, store dL/d(state after chunk n)
  bwd_dqk per (K tile, chunk, b*h):  dq, dk (sums over V tiles)
  bwd_dv  per (V tile, chunk, b*h):  dv (sums over K tiles, so no per-tile partials to add)
The backward recomputes h rather than saving it (B*H*NT*K*V elements). The last chunk may be
partial: every decay uses its true length n_t. Import this module only after setting
TRITON_INTERPRET=1 when running on CPU: ``triton.jit`` picks the interpreter at import time.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from .chunked import apply_normalizers


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # the interpreter multiplies bf16 bit patterns as integers: give it fp32 operands instead
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _fwd_h_kernel(
    k, v, h, h0, ht, g2, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    # int64 (batch, head) index: offsets past 2^31 elements stay valid on long sequences
    b_g = tl.load(g2 + i_bh % H)  # log2(gamma) of this head
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_kv = o_k[:, None] * V + o_v[None, :]  # offsets inside one (K, V) state
    m_kv = m_k[:, None] & m_v[None, :]
    p_kT = k + i_bh * T * K + o_k[:, None] + o_t[None, :] * K  # k^T tile of chunk 0
    p_v = v + i_bh * T * V + o_t[:, None] * V + o_v[None, :]
    p_h = h + i_bh * NT * K * V + p_kv
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(NT):
        tl.store(p_h + i_t * K * V, b_h.to(h.dtype.element_ty), mask=m_kv)
        n_t = tl.minimum(T - i_t * BT, BT)
        m_t = o_t < n_t
        b_kT = tl.load(p_kT + i_t * BT * K, mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_v = tl.load(p_v + i_t * BT * V, mask=m_t[:, None] & m_v[None, :], other=0.0)
        d_v = tl.exp2(tl.where(m_t, (n_t - 1 - o_t) * b_g, float("-inf")))
        b_vd = (b_v * d_v[:, None]).to(b_kT.dtype)
        b_h = b_h * tl.exp2(n_t * b_g) + _dot(b_kT, b_vd, PREC, UPCAST)
    if STORE_HT:
        tl.store(ht + i_bh * K * V + p_kv, b_h, mask=m_kv)


@triton.jit
def _fwd_o_kernel(
    q, k, v, h, o, g2, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b_g = tl.load(g2 + i_bh % H)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = (i_t * BT + o_t) < T
    m_v = o_v < V
    p_q = q + (i_bh * T + i_t * BT) * K + o_t[:, None] * K + o_k[None, :]
    p_kT = k + (i_bh * T + i_t * BT) * K + o_k[:, None] + o_t[None, :] * K
    p_h = h + (i_bh * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :]
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        m_k = (i_k * BK + o_k) < K
        b_q = tl.load(p_q + i_k * BK, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_kT = tl.load(p_kT + i_k * BK, mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_h = tl.load(p_h + i_k * BK * V, mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += _dot(b_q, b_h.to(b_q.dtype), PREC, UPCAST)
        b_s += _dot(b_q, b_kT, PREC, UPCAST)
    d_q = tl.exp2((o_t + 1) * b_g) * scale
    diff = o_t[:, None] - o_t[None, :]
    d_s = tl.exp2(tl.where(diff >= 0, diff * b_g, float("-inf"))) * scale
    p_tv = (i_bh * T + i_t * BT) * V + o_t[:, None] * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.0)
    b_o = b_o * d_q[:, None] + _dot((b_s * d_s).to(b_v.dtype), b_v, PREC, UPCAST)
    tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _bwd_dh_kernel(
    q, do, dh, dht, dh0, g2, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b_g = tl.load(g2 + i_bh % H)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    p_qT = q + i_bh * T * K + o_k[:, None] + o_t[None, :] * K
    p_do = do + i_bh * T * V + o_t[:, None] * V + o_v[None, :]
    p_dh = dh + i_bh * NT * K * V + p_kv
    d_q = tl.exp2((o_t + 1) * b_g) * scale
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_bh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(NT - 1, -1, -1):
        tl.store(p_dh + i_t * K * V, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        n_t = tl.minimum(T - i_t * BT, BT)
        m_t = o_t < n_t
        b_qT = tl.load(p_qT + i_t * BT * K, mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_do = tl.load(p_do + i_t * BT * V, mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_qd = (b_qT * d_q[None, :]).to(b_qT.dtype)
        b_dh = b_dh * tl.exp2(n_t * b_g) + _dot(b_qd, b_do.to(b_qT.dtype), PREC, UPCAST)
    if STORE_DH0:
        tl.store(dh0 + i_bh * K * V + p_kv, b_dh, mask=m_kv)


@triton.jit
def _bwd_dqk_kernel(
    q, k, v, h, do, dh, dq, dk, g2, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b_g = tl.load(g2 + i_bh % H)
    n_t = tl.minimum(T - i_t * BT, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_t, m_k = o_t < n_t, o_k < K
    d_q = tl.exp2((o_t + 1) * b_g) * scale
    d_k = tl.exp2(tl.where(m_t, (n_t - 1 - o_t) * b_g, float("-inf")))
    diff = o_t[:, None] - o_t[None, :]
    d_s = tl.exp2(tl.where(diff >= 0, diff * b_g, float("-inf"))) * scale  # [i, j], i >= j

    p_tk = (i_bh * T + i_t * BT) * K + o_t[:, None] * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    p_tv = (i_bh * T + i_t * BT) * V + o_t[:, None] * V + o_v[None, :]
    # h^T tile (BV, BK) of the state before this chunk, dh tile of the state after it
    p_hT = (i_bh * NT + i_t) * K * V + o_v[:, None] + o_k[None, :] * V
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        m_v = (i_v * BV + o_v) < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vk = m_v[:, None] & m_k[None, :]
        b_v = tl.load(v + p_tv + i_v * BV, mask=m_tv, other=0.0)
        b_do = tl.load(do + p_tv + i_v * BV, mask=m_tv, other=0.0).to(b_v.dtype)
        b_hT = tl.load(h + p_hT + i_v * BV, mask=m_vk, other=0.0).to(b_v.dtype)
        b_dhT = tl.load(dh + p_hT + i_v * BV, mask=m_vk, other=0.0).to(b_v.dtype)
        b_ds += _dot(b_do, tl.trans(b_v), PREC, UPCAST)  # do_i . v_j
        b_dq += _dot(b_do, b_hT, PREC, UPCAST)
        b_dk += _dot(b_v, b_dhT, PREC, UPCAST)
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0)
    b_ds = (b_ds * d_s).to(b_q.dtype)
    b_dq = b_dq * d_q[:, None] + _dot(b_ds, b_k, PREC, UPCAST)
    b_dk = b_dk * d_k[:, None] + _dot(tl.trans(b_ds), b_q, PREC, UPCAST)
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)


@triton.jit
def _bwd_dv_kernel(
    q, k, do, dh, dv, g2, scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b_g = tl.load(g2 + i_bh % H)
    n_t = tl.minimum(T - i_t * BT, BT)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < n_t, o_v < V
    d_k = tl.exp2(tl.where(m_t, (n_t - 1 - o_t) * b_g, float("-inf")))
    diff = o_t[None, :] - o_t[:, None]
    d_sT = tl.exp2(tl.where(diff >= 0, diff * b_g, float("-inf"))) * scale  # [j, i], i >= j

    p_k = k + (i_bh * T + i_t * BT) * K + o_t[:, None] * K + o_k[None, :]
    p_qT = q + (i_bh * T + i_t * BT) * K + o_k[:, None] + o_t[None, :] * K
    p_dh = dh + (i_bh * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :]
    b_sT = tl.zeros([BT, BT], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        m_k = (i_k * BK + o_k) < K
        b_k = tl.load(p_k + i_k * BK, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_qT = tl.load(p_qT + i_k * BK, mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_dh = tl.load(p_dh + i_k * BK * V, mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_sT += _dot(b_k, b_qT, PREC, UPCAST)  # k_j . q_i
        b_kd = (b_k * d_k[:, None]).to(b_k.dtype)
        b_dv += _dot(b_kd, b_dh.to(b_k.dtype), PREC, UPCAST)
    p_tv = (i_bh * T + i_t * BT) * V + o_t[:, None] * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
    b_dv += _dot((b_sT * d_sT).to(b_do.dtype), b_do, PREC, UPCAST)
    tl.store(dv + p_tv, b_dv.to(dv.dtype.element_ty), mask=m_tv)


# triton.jit chose between compiling and interpreting when this module was imported
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _tiles(K: int, V: int, block_kv: int) -> tuple[int, int]:
    tile = lambda d: min(block_kv, max(16, triton.next_power_of_2(d)))
    return tile(K), tile(V)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the accuracy path: no TF32 rounding inside the dots
    return "ieee" if dtype == torch.float32 else "tf32"


def _fwd_h(k, v, g2, h0, BT, BK, BV, store_ht):
    B, H, T, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    h = k.new_empty(B, H, NT, K, V)
    ht = k.new_empty(B, H, K, V, dtype=torch.float32) if store_ht else None
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)
    _fwd_h_kernel[grid](
        k, v, h, h0, ht, g2, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_H0=h0 is not None, STORE_HT=store_ht, PREC=_precision(k.dtype), UPCAST=_INTERPRETED,
    )  # fmt: skip
    return h, ht


class _ChunkRetentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g2, scale, h0, chunk_size, block_kv):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h0 = None if h0 is None else h0.contiguous()
        B, H, T, K = q.shape
        V = v.shape[-1]
        BT = chunk_size
        BK, BV = _tiles(K, V, block_kv)
        NT = triton.cdiv(T, BT)
        h, ht = _fwd_h(k, v, g2, h0, BT, BK, BV, store_ht=True)
        o = torch.empty_like(v)
        grid = (triton.cdiv(V, BV), NT, B * H)
        _fwd_o_kernel[grid](
            q, k, v, h, o, g2, scale, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
            PREC=_precision(q.dtype), UPCAST=_INTERPRETED,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, g2, h0)
        ctx.scale, ctx.tiles = scale, (BT, BK, BV)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g2, h0 = ctx.saved_tensors
        BT, BK, BV = ctx.tiles
        B, H, T, K = q.shape
        V = v.shape[-1]
        NT = triton.cdiv(T, BT)
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        prec = _precision(q.dtype)
        h, _ = _fwd_h(k, v, g2, h0, BT, BK, BV, store_ht=False)
        dh = q.new_empty(B, H, NT, K, V)
        dh0 = (
            torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
            if h0 is not None
            else None
        )
        grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)
        _bwd_dh_kernel[grid](
            q, do, dh, dht, dh0, g2, ctx.scale, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
            USE_DHT=dht is not None, STORE_DH0=h0 is not None, PREC=prec, UPCAST=_INTERPRETED,
        )  # fmt: skip
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _bwd_dqk_kernel[(triton.cdiv(K, BK), NT, B * H)](
            q, k, v, h, do, dh, dq, dk, g2, ctx.scale, T, NT,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec, UPCAST=_INTERPRETED,
        )  # fmt: skip
        _bwd_dv_kernel[(triton.cdiv(V, BV), NT, B * H)](
            q, k, do, dh, dv, g2, ctx.scale, T, NT,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec, UPCAST=_INTERPRETED,
        )  # fmt: skip
        dh0 = None if dh0 is None else dh0.to(h0.dtype)
        return dq, dk, dv, None, None, dh0, None, None


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"Triton retention needs a power-of-two chunk_size >= 16; got {chunk_size}"
        )


def retention_triton(
    q_BHLK: torch.Tensor,
    k_BHLK: torch.Tensor,
    v_BHLV: torch.Tensor,
    decay_H: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    offset: int = 0,
    normalize_decay: bool = False,
    normalize_scores: bool = False,
    chunk_size: int = 64,
    block_kv: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise retention through the Triton kernels; same contract as ``retention_chunked``.

    q, k, v must share a dtype (fp32 or bf16); o comes back in it and the state in fp32.
    ``block_kv`` caps the K/V tile (tests lower it to exercise several tiles on small dims).
    """
    _check_chunk(chunk_size)
    if not (q_BHLK.dtype == k_BHLK.dtype == v_BHLV.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_BHLK.dtype}, {k_BHLK.dtype}, {v_BHLV.dtype}")

    def core(q, k, v, log_decay, sc, h0):
        if q.shape[2] == 0:  # no chunk to launch: the state passes through
            B, H, _, K = q.shape
            state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if h0 is None else h0
            return torch.empty_like(v), state.float()
        g2 = (log_decay.float() / math.log(2.0)).contiguous().to(q.device)
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            return _ChunkRetentionFn.apply(q, k, v, g2, float(sc), h0, chunk_size, block_kv)

    return apply_normalizers(
        core,
        q_BHLK,
        k_BHLK,
        v_BHLV,
        decay_H,
        scale=scale,
        initial_state=initial_state,
        offset=offset,
        normalize_decay=normalize_decay,
        normalize_scores=normalize_scores,
    )
