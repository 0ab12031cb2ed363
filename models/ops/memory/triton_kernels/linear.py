"""Depth-1 memory kernels (M(x) = x W), grid (DV tiles, G): forward and backward.

A state column tile stays in registers; the backward walks chunks in reverse and writes
per-tile partials of dq, dk and the gate gradients (summed on the host, triton.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from models.ops.memory.triton_kernels.primitives import _coefs, _coefs_bwd, _dot_all, _mm


@triton.jit
def _lin_fwd_kernel(
    q, k, v, th, lk, le, ws, ss, y, L, NT, chunk,
    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_v, i_g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    p_kv = o_k[:, None] * DV + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    p_ws, p_ss = ws + i_g * (NT + 1) * DK * DV + p_kv, ss + i_g * (NT + 1) * DK * DV + p_kv
    b_x = tl.load(p_ws, mask=m_kv, other=0.0)  # slot 0 = initial state, written by the host
    b_s = b_x
    if MOM:
        b_s = tl.load(p_ss, mask=m_kv, other=0.0)
    for i_c in range(NT):
        t0 = i_c * chunk
        n_t = tl.minimum(L - t0, chunk)
        m_t = o_t < n_t
        row = i_g * L + t0 + o_t
        m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + row[:, None] * DK + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + row[:, None] * DK + o_k[None, :], mask=m_tk, other=0.0)
        b_v = tl.load(v + row[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0)
        co = _coefs(th + i_g * L + t0, lk + i_g * L + t0, le + i_g * L + t0, n_t, BT, MOM, PREC)
        _u1, beta, _u2, _u3, _u4, _u5, cmat, cvec, w_end, h_end, beta_n, c_n, eps_n = co
        b_d = 2.0 * (_mm(b_k, b_x, PREC) - b_v)  # l2 bias: δ = 2 (k W0 - v)
        b_gc = _mm(b_q, tl.trans(b_k), PREC) * cmat
        b_y = beta[:, None] * _mm(b_q, b_x, PREC) - _mm(b_gc, b_d, PREC)
        b_kt = tl.trans(b_k)
        b_xn = beta_n * b_x - _mm(b_kt, w_end[:, None] * b_d, PREC)
        if MOM:
            b_y += cvec[:, None] * _mm(b_q, b_s, PREC)
            b_xn += c_n * b_s
            b_s = eps_n * b_s - _mm(b_kt, h_end[:, None] * b_d, PREC)
            tl.store(p_ss + (i_c + 1) * DK * DV, b_s, mask=m_kv)
        b_x = b_xn
        tl.store(p_ws + (i_c + 1) * DK * DV, b_x, mask=m_kv)
        tl.store(y + row[:, None] * DV + o_v[None, :], b_y, mask=m_tv)


@triton.jit
def _lin_bwd_kernel(
    q, k, v, th, lk, le, ws, ss, dy, dwe, dse, dq, dk, dv, dth, dlk, dle, dw0, ds0,
    G, L, NT, chunk,
    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_v, i_g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    p_kv = o_k[:, None] * DV + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    p_ws, p_ss = ws + i_g * (NT + 1) * DK * DV + p_kv, ss + i_g * (NT + 1) * DK * DV + p_kv
    part = (i_v * G + i_g) * L  # this Dout tile's slot in the partial-sum outputs
    b_dx = tl.load(dwe + i_g * DK * DV + p_kv, mask=m_kv, other=0.0)  # dL/d(state after)
    b_ds = b_dx
    if MOM:
        b_ds = tl.load(dse + i_g * DK * DV + p_kv, mask=m_kv, other=0.0)
    for i_r in range(NT):
        i_c = NT - 1 - i_r
        t0 = i_c * chunk
        n_t = tl.minimum(L - t0, chunk)
        m_t = o_t < n_t
        row = i_g * L + t0 + o_t
        m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
        b_x = tl.load(p_ws + i_c * DK * DV, mask=m_kv, other=0.0)
        b_q = tl.load(q + row[:, None] * DK + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + row[:, None] * DK + o_k[None, :], mask=m_tk, other=0.0)
        b_v = tl.load(v + row[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0)
        b_do = tl.load(dy + row[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0)
        co = _coefs(th + i_g * L + t0, lk + i_g * L + t0, le + i_g * L + t0, n_t, BT, MOM, PREC)
        b_th, beta, amat, eps, emat, fmat, cmat, cvec, w_end, h_end, beta_n, c_n, eps_n = co
        is_n = o_t == n_t - 1

        b_d = 2.0 * (_mm(b_k, b_x, PREC) - b_v)
        b_g = _mm(b_q, tl.trans(b_k), PREC)
        b_kdx = _mm(b_k, b_dx, PREC)
        # dL/dδ from the retrieval, the chunk-end state and (below) the momentum end state
        b_dd = -_mm(tl.trans(b_g * cmat), b_do, PREC) - w_end[:, None] * b_kdx
        b_dyd = _mm(b_do, tl.trans(b_d), PREC)  # [t, i] = dy_t · δ_i
        b_dg = -b_dyd * cmat
        b_dq = beta[:, None] * _mm(b_do, tl.trans(b_x), PREC) + _mm(b_dg, b_k, PREC)
        b_dk = _mm(tl.trans(b_dg), b_q, PREC) - w_end[:, None] * _mm(b_d, tl.trans(b_dx), PREC)
        # coefficient gradients; C's row n is also the state update's weight vector
        dcm = tl.where(o_t[:, None] >= o_t[None, :], -b_dyd * b_g, 0.0)
        dcm += tl.where(is_n[:, None], -tl.sum(b_kdx * b_d, axis=1)[None, :], 0.0)
        dbeta = tl.sum(b_do * _mm(b_q, b_x, PREC), axis=1) + tl.where(
            is_n, _dot_all(b_dx, b_x), 0.0
        )
        b_dxn = beta_n * b_dx + _mm(tl.trans(b_q), beta[:, None] * b_do, PREC)
        if MOM:
            b_s = tl.load(p_ss + i_c * DK * DV, mask=m_kv, other=0.0)
            b_kds = _mm(b_k, b_ds, PREC)
            b_dd -= h_end[:, None] * b_kds
            b_dq += cvec[:, None] * _mm(b_do, tl.trans(b_s), PREC)
            b_dk -= h_end[:, None] * _mm(b_d, tl.trans(b_ds), PREC)
            dcvec = tl.sum(b_do * _mm(b_q, b_s, PREC), axis=1)
            dcvec += tl.where(is_n, _dot_all(b_dx, b_s), 0.0)
            dh = -tl.sum(b_kds * b_d, axis=1)
            deps_n = _dot_all(b_ds, b_s)
            b_ds = c_n * b_dx + eps_n * b_ds + _mm(tl.trans(b_q), cvec[:, None] * b_do, PREC)
        else:
            dcvec, dh, deps_n = dbeta * 0.0, dbeta * 0.0, 0.0
        b_dp = 2.0 * b_dd
        b_dk += _mm(b_dp, tl.trans(b_x), PREC)
        b_dx = b_dxn + _mm(tl.trans(b_k), b_dp, PREC)
        d_th, d_lk, d_le = _coefs_bwd(
            dcm, dbeta, dcvec, dh, deps_n, b_th, beta, amat, eps, emat, fmat, n_t, BT, MOM, PREC
        )
        tl.store(dv + row[:, None] * DV + o_v[None, :], -b_dp, mask=m_tv)
        p_tk = (part + t0 + o_t)[:, None] * DK + o_k[None, :]
        tl.store(dq + p_tk, b_dq, mask=m_tk)
        tl.store(dk + p_tk, b_dk, mask=m_tk)
        tl.store(dth + part + t0 + o_t, d_th, mask=m_t)
        tl.store(dlk + part + t0 + o_t, d_lk, mask=m_t)
        if MOM:
            tl.store(dle + part + t0 + o_t, d_le, mask=m_t)
    tl.store(dw0 + i_g * DK * DV + p_kv, b_dx, mask=m_kv)
    if MOM:
        tl.store(ds0 + i_g * DK * DV + p_kv, b_ds, mask=m_kv)
