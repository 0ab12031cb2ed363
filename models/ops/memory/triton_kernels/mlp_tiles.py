"""Depth-2 memory (M(x) = [x +] gelu(x W1) W2): the per-chunk pieces the walking kernels
(mlp_walk.py) and the split kernels (mlp_split.py) share: a chunk's rows and coefficients, the
hidden tile offsets, and each hidden tile's forward and backward terms."""

from __future__ import annotations

import triton
import triton.language as tl

from models.ops.memory.triton_kernels.primitives import (
    _coefs,
    _coefs_bwd,
    _dot_all,
    _gelu_dd,
    _gelu_pair,
    _mm,
)


@triton.jit
def _chunk_rows(
    q, k, v, dy, th, lk, le, i_g, L, i_c, chunk,
    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, WITH_DY: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Chunk i_c of group i_g: rows of q, k, v (and dy) masked past the chunk, its length and
    its coefficients (_coefs)."""
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    t0 = i_c * chunk
    n_t = tl.minimum(L - t0, chunk)
    m_t = o_t < n_t
    row = i_g * L + t0 + o_t
    m_tk, m_tv = m_t[:, None] & (o_k < DK)[None, :], m_t[:, None] & (o_v < DV)[None, :]
    b_q = tl.load(q + row[:, None] * DK + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k + row[:, None] * DK + o_k[None, :], mask=m_tk, other=0.0)
    b_v = tl.load(v + row[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0)
    b_do = b_v
    if WITH_DY:
        b_do = tl.load(dy + row[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0)
    co = _coefs(th + i_g * L + t0, lk + i_g * L + t0, le + i_g * L + t0, n_t, BT, MOM, PREC)
    return b_q, b_k, b_v, b_do, n_t, co


@triton.jit
def _tile_offsets(
    i_n, DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Offsets and masks of hidden tile i_n in a (DK, DN) and a (DN, DV) state."""
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < DN
    p1, p2 = o_k[:, None] * DN + o_n[None, :], o_n[:, None] * DV + o_v[None, :]
    m1, m2 = (o_k < DK)[:, None] & m_n[None, :], m_n[:, None] & (o_v < DV)[None, :]
    return p1, p2, m1, m2


@triton.jit
def _mlp_part(
    b_k, w1s, w2s, c1, c2, i_n, DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """gelu(k W1[:, n]) W2[n, :]: hidden tile i_n's term of M(k) at the state at (c1, c2)."""
    p1, p2, m1, m2 = _tile_offsets(i_n, DK, DN, DV, BK, BN, BV)
    b_w1 = tl.load(w1s + c1 + p1, mask=m1, other=0.0)
    b_w2 = tl.load(w2s + c2 + p2, mask=m2, other=0.0)
    b_a1, _u1 = _gelu_pair(_mm(b_k, b_w1, PREC))
    return _mm(b_a1, b_w2, PREC)


@triton.jit
def _mlp_fwd_tile(
    b_q, b_k, b_d2, b_gc1, w1s, w2s, s1s, s2s, c1, c2, i_n,
    beta, cvec, w_end, h_end, beta_n, c_n, eps_n,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    BV: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Hidden tile i_n of a chunk's forward: stores the tile of the chunk-end state (the slot
    after (c1, c2)) and returns the tile's retrieval terms β ar W2 (+ c ar S2), ar a1ᵀ (its
    share of G2, whose (G2 ⊙ C) δ2 the caller subtracts) and the tile's new weights."""
    n1, n2 = DK * DN, DN * DV
    p1, p2, m1, m2 = _tile_offsets(i_n, DK, DN, DV, BK, BN, BV)
    b_w1 = tl.load(w1s + c1 + p1, mask=m1, other=0.0)
    b_w2 = tl.load(w2s + c2 + p2, mask=m2, other=0.0)
    b_a1, b_gp = _gelu_pair(_mm(b_k, b_w1, PREC))
    b_d1 = _mm(b_d2, tl.trans(b_w2), PREC) * b_gp
    b_h = beta[:, None] * _mm(b_q, b_w1, PREC) - _mm(b_gc1, b_d1, PREC)
    b_w1n = beta_n * b_w1 - _mm(tl.trans(b_k), w_end[:, None] * b_d1, PREC)
    b_w2n = beta_n * b_w2 - _mm(tl.trans(b_a1), w_end[:, None] * b_d2, PREC)
    if MOM:
        b_s1 = tl.load(s1s + c1 + p1, mask=m1, other=0.0)
        b_s2 = tl.load(s2s + c2 + p2, mask=m2, other=0.0)
        b_h += cvec[:, None] * _mm(b_q, b_s1, PREC)
    b_ar, _u1 = _gelu_pair(b_h)
    b_y = beta[:, None] * _mm(b_ar, b_w2, PREC)
    if MOM:
        b_y += cvec[:, None] * _mm(b_ar, b_s2, PREC)
        b_w1n += c_n * b_s1
        b_w2n += c_n * b_s2
        b_s1 = eps_n * b_s1 - _mm(tl.trans(b_k), h_end[:, None] * b_d1, PREC)
        b_s2 = eps_n * b_s2 - _mm(tl.trans(b_a1), h_end[:, None] * b_d2, PREC)
        tl.store(s1s + c1 + n1 + p1, b_s1, mask=m1)
        tl.store(s2s + c2 + n2 + p2, b_s2, mask=m2)
    tl.store(w1s + c1 + n1 + p1, b_w1n, mask=m1)
    tl.store(w2s + c2 + n2 + p2, b_w2n, mask=m2)
    return b_y, _mm(b_ar, tl.trans(b_a1), PREC), b_w1n, b_w2n


@triton.jit
def _mlp_tile_bwd(
    b_q, b_k, b_do, b_d2, b_gc1, b_dg2, b_w1, b_w2, b_s1, b_s2, b_dw1, b_ds1,
    beta, cvec, w_end, h_end, MOM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One hidden tile of a chunk: the forward quantities and the gradients of the retrieval's
    layer-1 pre-activation (dh) and of δ1 (dd1, through the retrieval and the chunk-end state).
    """
    b_z = _mm(b_k, b_w1, PREC)
    b_a1, b_g1 = _gelu_pair(b_z)
    b_d1p = _mm(b_d2, tl.trans(b_w2), PREC)  # δ1 before the gelu' factor
    b_d1 = b_d1p * b_g1
    b_qw1 = _mm(b_q, b_w1, PREC)
    b_h = beta[:, None] * b_qw1 - _mm(b_gc1, b_d1, PREC)
    b_dar = beta[:, None] * _mm(b_do, tl.trans(b_w2), PREC) + _mm(b_dg2, b_a1, PREC)
    b_kdw1 = _mm(b_k, b_dw1, PREC)
    b_dd1 = -w_end[:, None] * b_kdw1
    if MOM:
        b_qs1 = _mm(b_q, b_s1, PREC)
        b_h += cvec[:, None] * b_qs1
        b_dar += cvec[:, None] * _mm(b_do, tl.trans(b_s2), PREC)
        b_kds1 = _mm(b_k, b_ds1, PREC)
        b_dd1 -= h_end[:, None] * b_kds1
    else:
        b_qs1, b_kds1 = b_qw1, b_kdw1
    b_ar, b_gr = _gelu_pair(b_h)
    b_dh = b_dar * b_gr
    b_dd1 -= _mm(tl.trans(b_gc1), b_dh, PREC)
    return b_z, b_a1, b_g1, b_d1p, b_d1, b_qw1, b_qs1, b_ar, b_dh, b_dd1, b_kdw1, b_kds1


@triton.jit
def _bwd_tile_loads(
    w1s, w2s, s1s, s2s, dw1, dw2, ds1, ds2, c1, c2, rd1, rd2, i_n,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    BV: tl.constexpr, MOM: tl.constexpr,
):  # fmt: skip
    """Hidden tile i_n of the chunk-start state and of dL/d(state after the chunk)."""
    p1, p2, m1, m2 = _tile_offsets(i_n, DK, DN, DV, BK, BN, BV)
    b_w1 = tl.load(w1s + c1 + p1, mask=m1, other=0.0)
    b_w2 = tl.load(w2s + c2 + p2, mask=m2, other=0.0)
    b_dw1 = tl.load(dw1 + rd1 + p1, mask=m1, other=0.0)
    b_dw2 = tl.load(dw2 + rd2 + p2, mask=m2, other=0.0)
    if MOM:
        b_s1 = tl.load(s1s + c1 + p1, mask=m1, other=0.0)
        b_s2 = tl.load(s2s + c2 + p2, mask=m2, other=0.0)
        b_ds1 = tl.load(ds1 + rd1 + p1, mask=m1, other=0.0)
        b_ds2 = tl.load(ds2 + rd2 + p2, mask=m2, other=0.0)
    else:
        b_s1, b_s2, b_ds1, b_ds2 = b_w1, b_w2, b_dw1, b_dw2
    return b_w1, b_w2, b_dw1, b_dw2, b_s1, b_s2, b_ds1, b_ds2, p1, p2, m1, m2


@triton.jit
def _mlp_bwd_sum_tile(
    b_q, b_k, b_do, b_d2, b_gc1, b_dg2, w1s, w2s, s1s, s2s, dw1, dw2, ds1, ds2,
    c1, c2, rd1, rd2, i_n, is_n, beta, cvec, w_end, h_end,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    BV: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Backward pass 2, hidden tile i_n: the tile's terms of every sum over the hidden width
    (G2, Σ dh δ1ᵀ, dL/dδ2, dq, dk, and the per-row gate terms)."""
    ld = _bwd_tile_loads(
        w1s, w2s, s1s, s2s, dw1, dw2, ds1, ds2, c1, c2, rd1, rd2, i_n, DK, DN, DV, BK, BN, BV, MOM
    )
    b_w1, b_w2, b_dw1, b_dw2, b_s1, b_s2, b_ds1, b_ds2, _u1, _u2, _u3, _u4 = ld
    tile = _mlp_tile_bwd(
        b_q, b_k, b_do, b_d2, b_gc1, b_dg2, b_w1, b_w2, b_s1, b_s2, b_dw1, b_ds1,
        beta, cvec, w_end, h_end, MOM, PREC,
    )  # fmt: skip
    _u5, b_a1, b_g1p, _u6, b_d1, b_qw1, b_qs1, b_ar, b_dh, b_dd1, b_kdw1, b_kds1 = tile
    b_a1dw2 = _mm(b_a1, b_dw2, PREC)
    b_dd2 = _mm(b_dd1 * b_g1p, b_w2, PREC) - w_end[:, None] * b_a1dw2
    dwv = -(tl.sum(b_d1 * b_kdw1, axis=1) + tl.sum(b_d2 * b_a1dw2, axis=1))
    dbeta = tl.sum(b_do * _mm(b_ar, b_w2, PREC), axis=1) + tl.sum(b_dh * b_qw1, axis=1)
    dbeta += tl.where(is_n, _dot_all(b_dw1, b_w1) + _dot_all(b_dw2, b_w2), 0.0)
    b_dq = beta[:, None] * _mm(b_dh, tl.trans(b_w1), PREC)
    b_dk = -w_end[:, None] * _mm(b_d1, tl.trans(b_dw1), PREC)
    dhv, dcv, depsv = dwv * 0.0, dwv * 0.0, dwv * 0.0
    if MOM:
        b_a1ds2 = _mm(b_a1, b_ds2, PREC)
        b_dd2 -= h_end[:, None] * b_a1ds2
        dhv = -(tl.sum(b_d1 * b_kds1, axis=1) + tl.sum(b_d2 * b_a1ds2, axis=1))
        dcv = tl.sum(b_do * _mm(b_ar, b_s2, PREC), axis=1) + tl.sum(b_dh * b_qs1, axis=1)
        dcv += tl.where(is_n, _dot_all(b_dw1, b_s1) + _dot_all(b_dw2, b_s2), 0.0)
        depsv = tl.where(is_n, _dot_all(b_ds1, b_s1) + _dot_all(b_ds2, b_s2), 0.0)
        b_dq += cvec[:, None] * _mm(b_dh, tl.trans(b_s1), PREC)
        b_dk -= h_end[:, None] * _mm(b_d1, tl.trans(b_ds1), PREC)
    b_g2 = _mm(b_ar, tl.trans(b_a1), PREC)
    b_hd = _mm(b_dh, tl.trans(b_d1), PREC)
    return b_g2, b_hd, b_dd2, b_dq, b_dk, dwv, dbeta, dhv, dcv, depsv


@triton.jit
def _mlp_bwd_state_tile(
    b_q, b_k, b_do, b_d2, b_gc1, b_dg2, b_dp, w1s, w2s, s1s, s2s, dw1, dw2, ds1, ds2,
    c1, c2, rd1, rd2, wr1, wr2, i_n, beta, cvec, w_end, h_end, beta_n, c_n, eps_n,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    BV: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Backward pass 3, hidden tile i_n: stores the tile of dL/d(chunk-start state) in the
    other dstate slot (wr1, wr2) and returns the tile's dk term through the keys' forward."""
    ld = _bwd_tile_loads(
        w1s, w2s, s1s, s2s, dw1, dw2, ds1, ds2, c1, c2, rd1, rd2, i_n, DK, DN, DV, BK, BN, BV, MOM
    )
    b_w1, b_w2, b_dw1, b_dw2, b_s1, b_s2, b_ds1, b_ds2, p1, p2, m1, m2 = ld
    tile = _mlp_tile_bwd(
        b_q, b_k, b_do, b_d2, b_gc1, b_dg2, b_w1, b_w2, b_s1, b_s2, b_dw1, b_ds1,
        beta, cvec, w_end, h_end, MOM, PREC,
    )  # fmt: skip
    b_z, b_a1, b_g1p, b_d1p, _u1, _u2, _u3, b_ar, b_dh, b_dd1, _u4, _u5 = tile
    b_da1 = _mm(tl.trans(b_dg2), b_ar, PREC) + _mm(b_dp, tl.trans(b_w2), PREC)
    b_da1 -= w_end[:, None] * _mm(b_d2, tl.trans(b_dw2), PREC)
    if MOM:
        b_da1 -= h_end[:, None] * _mm(b_d2, tl.trans(b_ds2), PREC)
    b_dz = b_da1 * b_g1p + b_dd1 * b_d1p * _gelu_dd(b_z)
    b_qt, b_kt, b_at = tl.trans(b_q), tl.trans(b_k), tl.trans(b_ar)
    b_n1 = beta_n * b_dw1 + _mm(b_qt, beta[:, None] * b_dh, PREC) + _mm(b_kt, b_dz, PREC)
    b_n2 = beta_n * b_dw2 + _mm(b_at, beta[:, None] * b_do, PREC)
    b_n2 += _mm(tl.trans(b_dd1 * b_g1p), b_d2, PREC) + _mm(tl.trans(b_a1), b_dp, PREC)
    tl.store(dw1 + wr1 + p1, b_n1, mask=m1)
    tl.store(dw2 + wr2 + p2, b_n2, mask=m2)
    if MOM:
        b_m1 = c_n * b_dw1 + eps_n * b_ds1 + _mm(b_qt, cvec[:, None] * b_dh, PREC)
        b_m2 = c_n * b_dw2 + eps_n * b_ds2 + _mm(b_at, cvec[:, None] * b_do, PREC)
        tl.store(ds1 + wr1 + p1, b_m1, mask=m1)
        tl.store(ds2 + wr2 + p2, b_m2, mask=m2)
    return _mm(b_dz, tl.trans(b_w1), PREC)


@triton.jit
def _mlp_bwd_finish(
    dq, dk, dv, dth, dlk, dle, b_q, b_k, b_do, b_dyd2, b_g1, b_g2, b_hd, b_dq, b_dk, b_dp,
    dwv, dbeta, dhv, dcv, depsv, co, i_g, L, i_c, chunk, n_t,
    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, RESIDUAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """A chunk's input gradients from the hidden-width sums: the coefficient gradient dC, the
    dual-form terms of dq / dk, the gate gradients (_coefs_bwd); stores dq, dk, dv, dθ, dlog
    gates. b_dk must already hold pass 3's terms."""
    b_th, beta, amat, eps, emat, fmat, cmat, _u1, _u2, _u3, _u4, _u5, _u6 = co
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    is_n = o_t == n_t - 1
    dcm = tl.where(o_t[:, None] >= o_t[None, :], -b_dyd2 * b_g2 - b_hd * b_g1, 0.0)
    dcm += tl.where(is_n[:, None], dwv[None, :], 0.0)
    b_dg1 = -b_hd * cmat
    b_dq += _mm(b_dg1, b_k, PREC)
    b_dk += _mm(tl.trans(b_dg1), b_q, PREC)
    if RESIDUAL:
        b_dq += b_do
        b_dk += b_dp
    d_th, d_lk, d_le = _coefs_bwd(
        dcm, dbeta, dcv, dhv, depsv, b_th, beta, amat, eps, emat, fmat, n_t, BT, MOM, PREC
    )
    t0 = i_c * chunk
    m_t = o_t < n_t
    row = i_g * L + t0 + o_t
    m_tk, m_tv = m_t[:, None] & (o_k < DK)[None, :], m_t[:, None] & (o_v < DV)[None, :]
    tl.store(dv + row[:, None] * DV + o_v[None, :], -b_dp, mask=m_tv)
    tl.store(dq + row[:, None] * DK + o_k[None, :], b_dq, mask=m_tk)
    tl.store(dk + row[:, None] * DK + o_k[None, :], b_dk, mask=m_tk)
    tl.store(dth + i_g * L + t0 + o_t, d_th, mask=m_t)
    tl.store(dlk + i_g * L + t0 + o_t, d_lk, mask=m_t)
    if MOM:
        tl.store(dle + i_g * L + t0 + o_t, d_le, mask=m_t)
