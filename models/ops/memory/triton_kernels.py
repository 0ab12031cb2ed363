"""Triton kernels of the neural-memory op (host code, dispatch and autograd: triton.py).

Legend: G = B*H, L tokens, NT chunks of b = `chunk` tokens held in a BT-row tile (BT =
max(16, pow2(b)); rows >= the chunk's length n_t are masked and act as θ = 0, α = 0, η = 1),
DK / DN / DV the memory's input / hidden / output widths, BK / BN / BV their tiles. Inputs are
fp32 (G, L, ...) contiguous; states (G, NT + 1, d_in, d_out) hold every chunk-start state.

Per chunk, as chunked.py derives it (l2 bias, l2 retention): the keys through the memory at
the chunk-start weights, δ = 2 (M(k) - v) backpropagated to every layer (token i's gradient
is the outer product z_i δ_iᵀ), C = (A @ E) diag(θ), the masked dual-form retrieval
(Q Zᵀ ⊙ C) Δ and the chunk-end state from C's last row.
  _lin_fwd_kernel / _lin_bwd_kernel  depth 1, grid (DV tiles, G): a state column tile stays
      in registers; backward walks chunks in reverse, writes per-tile partials of dq, dk and
      the gate gradients (summed on the host).
  _mlp_fwd_kernel / _mlp_bwd_kernel  depth 2, grid (G,): the hidden width is walked in BN
      tiles with the state in global memory; the backward recomputes each chunk from its saved
      start state in three passes over the tiles (δ2; then everything that sums over the
      hidden width; then the per-tile weight gradients) and ping-pongs dstate in a 2-slot
      buffer.
  _mlp_part_kernel / _mlp_split_*  depth 2 split, grid (hidden tiles, G), launched per chunk
      (one forward launch, two backward): the hidden-width sums travel through small partial
      buffers between launches (layout and schedule: the comment above them, end of file).
Import only after setting TRITON_INTERPRET=1 when running on CPU: ``triton.jit`` picks the
interpreter at import time.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot_all(a, b):
    """<a, b> summed over both axes (a matrix inner product, e.g. <dL/dW_end, W_0>)."""
    return tl.sum(tl.sum(a * b, axis=1), axis=0)


@triton.jit
def _gelu_pair(x):
    """(gelu(x), gelu'(x)) exact (erf) GELU, as chunked.py's _GeluPair."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return x * cdf, cdf + x * pdf


@triton.jit
def _coefs(th_p, lk_p, le_p, n_t, BT: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr):
    """Decay / momentum coefficients of one chunk; rows >= n_t act as θ = 0, α = 0, η = 1.

    A[t, s] = β_t/β_s and E[s, i] = ε_s/ε_i come from masked segment sums (cumsum of a
    triangle, not a difference of cumsums) so long chunks with strong decay stay exact.
    """
    o_t = tl.arange(0, BT)
    m_t = o_t < n_t
    low = o_t[:, None] >= o_t[None, :]
    strict = o_t[:, None] > o_t[None, :]
    th = tl.load(th_p + o_t, mask=m_t, other=0.0)
    lk = tl.load(lk_p + o_t, mask=m_t, other=0.0)
    beta = tl.exp(tl.cumsum(lk, axis=0))
    amat = tl.where(low, tl.exp(tl.cumsum(tl.where(strict, lk[:, None], 0.0), axis=0)), 0.0)
    end = o_t[:, None] == n_t - 1
    if MOM:
        le = tl.load(le_p + o_t, mask=m_t, other=0.0)
        eps = tl.exp(tl.cumsum(le, axis=0))
        emat = tl.where(low, tl.exp(tl.cumsum(tl.where(strict, le[:, None], 0.0), axis=0)), 0.0)
        fmat = _mm(amat, emat, PREC)
        cvec = tl.sum(amat * eps[None, :], axis=1)
    else:
        eps, emat, fmat, cvec = beta, amat, amat, beta * 0.0
    cmat = fmat * th[None, :]
    w_end = tl.sum(tl.where(end, cmat, 0.0), axis=0)  # C[n, :], weights of the state update
    h_end = tl.sum(tl.where(end, emat, 0.0), axis=0) * th  # momentum's update weights
    is_n = o_t == n_t - 1
    beta_n = tl.sum(tl.where(is_n, beta, 0.0), axis=0)
    c_n = tl.sum(tl.where(is_n, cvec, 0.0), axis=0)
    eps_n = tl.sum(tl.where(is_n, eps, 0.0), axis=0)
    return th, beta, amat, eps, emat, fmat, cmat, cvec, w_end, h_end, beta_n, c_n, eps_n


@triton.jit
def _coefs_bwd(
    dcm, dbeta, dcvec, dh, deps_n, th, beta, amat, eps, emat, fmat, n_t,
    BT: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Gradients of θ, log(1-α), log η from those of C, β, c, h = E[n]θ and ε_n.

    A[t, s] = exp(cl_t - cl_s) with cl = cumsum(log(1-α)): d cl_t = Σ_s R[t, s] - Σ_t' R[t', t]
    with R = dA ⊙ A, then d log(1-α) = reverse cumsum of d cl (same for E and log η).
    """
    o_t = tl.arange(0, BT)
    is_n = o_t == n_t - 1
    dth = tl.sum(dcm * fmat, axis=0)
    dfm = dcm * th[None, :]
    if MOM:
        e_n = tl.sum(tl.where(is_n[:, None], emat, 0.0), axis=0)
        dth += dh * e_n
        da = _mm(dfm, tl.trans(emat), PREC) + dcvec[:, None] * eps[None, :]
        de = _mm(tl.trans(amat), dfm, PREC) + tl.where(is_n[:, None], (dh * th)[None, :], 0.0)
        deps = tl.sum(amat * dcvec[:, None], axis=0) + tl.where(is_n, deps_n, 0.0)
        re = de * emat
        dce = deps * eps + tl.sum(re, axis=1) - tl.sum(re, axis=0)
        dle = tl.cumsum(dce, axis=0, reverse=True)
    else:
        da = dfm
        dle = dth * 0.0
    ra = da * amat
    dcl = dbeta * beta + tl.sum(ra, axis=1) - tl.sum(ra, axis=0)
    dlk = tl.cumsum(dcl, axis=0, reverse=True)
    return dth, dlk, dle


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


@triton.jit
def _gelu_dd(x):
    """gelu''(x) = φ(x) (2 - x²): the derivative of gelu' that δ1 = (δ2 W2ᵀ) ⊙ gelu'(z) has."""
    return tl.exp(-0.5 * x * x) * 0.3989422804014327 * (2.0 - x * x)


# ---- depth 2: per-chunk pieces shared by the walking and the split kernels ----


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


# ---- depth 2, walking: one program per (batch, head) walks the hidden tiles ----


@triton.jit
def _mlp_delta2(
    b_k, b_v, w1s, w2s, c1, c2, DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, RESIDUAL: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """δ2 = 2 (M(k) - v) at the chunk-start weights (c1, c2), summing over hidden tiles."""
    b_p = tl.zeros([BT, BV], dtype=tl.float32)
    for i_n in range(tl.cdiv(DN, BN)):
        b_p += _mlp_part(b_k, w1s, w2s, c1, c2, i_n, DK, DN, DV, BK, BN, BV, PREC)
    if RESIDUAL:
        b_p += b_k
    return 2.0 * (b_p - b_v)


@triton.jit
def _mlp_fwd_kernel(
    q, k, v, th, lk, le, w1s, w2s, s1s, s2s, y, L, NT, chunk,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, RESIDUAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_g = tl.program_id(0).to(tl.int64)
    o_t, o_v = tl.arange(0, BT), tl.arange(0, BV)
    n1, n2 = DK * DN, DN * DV
    for i_c in range(NT):
        b_q, b_k, b_v, _u1, n_t, co = _chunk_rows(
            q, k, v, v, th, lk, le, i_g, L, i_c, chunk, DK, DV, BT, BK, BV, MOM, False, PREC
        )
        _u2, beta, _u3, _u4, _u5, _u6, cmat, cvec, w_end, h_end, beta_n, c_n, eps_n = co
        c1, c2 = (i_g * (NT + 1) + i_c) * n1, (i_g * (NT + 1) + i_c) * n2
        b_d2 = _mlp_delta2(b_k, b_v, w1s, w2s, c1, c2, DK, DN, DV, BT, BK, BN, BV, RESIDUAL, PREC)
        b_gc1 = _mm(b_q, tl.trans(b_k), PREC) * cmat
        b_y = tl.zeros([BT, BV], dtype=tl.float32)
        b_g2 = tl.zeros([BT, BT], dtype=tl.float32)
        for i_n in range(tl.cdiv(DN, BN)):
            y_n, g2_n, _u7, _u8 = _mlp_fwd_tile(
                b_q, b_k, b_d2, b_gc1, w1s, w2s, s1s, s2s, c1, c2, i_n,
                beta, cvec, w_end, h_end, beta_n, c_n, eps_n, DK, DN, DV, BK, BN, BV, MOM, PREC,
            )  # fmt: skip
            b_y += y_n
            b_g2 += g2_n
        b_y -= _mm(b_g2 * cmat, b_d2, PREC)
        if RESIDUAL:
            b_y += b_q
        m_t = o_t < n_t
        row = i_g * L + i_c * chunk + o_t
        m_tv = m_t[:, None] & (o_v < DV)[None, :]
        tl.store(y + row[:, None] * DV + o_v[None, :], b_y, mask=m_tv)
        tl.debug_barrier()  # the next chunk reads the state other threads just stored


@triton.jit
def _mlp_bwd_kernel(
    q, k, v, th, lk, le, w1s, w2s, s1s, s2s, dy, dw1, dw2, ds1, ds2,
    dq, dk, dv, dth, dlk, dle, L, NT, chunk,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, RESIDUAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    i_g = tl.program_id(0).to(tl.int64)
    o_t = tl.arange(0, BT)
    n1, n2 = DK * DN, DN * DV
    for i_r in range(NT):
        i_c = NT - 1 - i_r
        # dL/d(state after this chunk) is in slot i_r % 2; dL/d(state before) goes to the other
        rd1, rd2 = (2 * i_g + i_r % 2) * n1, (2 * i_g + i_r % 2) * n2
        wr1, wr2 = (2 * i_g + (i_r + 1) % 2) * n1, (2 * i_g + (i_r + 1) % 2) * n2
        b_q, b_k, b_v, b_do, n_t, co = _chunk_rows(
            q, k, v, dy, th, lk, le, i_g, L, i_c, chunk, DK, DV, BT, BK, BV, MOM, True, PREC
        )
        _u1, beta, _u2, _u3, _u4, _u5, cmat, cvec, w_end, h_end, beta_n, c_n, eps_n = co
        is_n = o_t == n_t - 1
        c1, c2 = (i_g * (NT + 1) + i_c) * n1, (i_g * (NT + 1) + i_c) * n2

        # pass 1: δ2 (needs the whole hidden width)
        b_d2 = _mlp_delta2(b_k, b_v, w1s, w2s, c1, c2, DK, DN, DV, BT, BK, BN, BV, RESIDUAL, PREC)
        b_g1 = _mm(b_q, tl.trans(b_k), PREC)
        b_gc1 = b_g1 * cmat
        b_dyd2 = _mm(b_do, tl.trans(b_d2), PREC)  # [t, i] = dy_t · δ2_i
        b_dg2 = -b_dyd2 * cmat

        # pass 2: everything that sums over the hidden width
        b_g2 = tl.zeros([BT, BT], dtype=tl.float32)
        b_hd = tl.zeros([BT, BT], dtype=tl.float32)  # Σ_tiles dh δ1ᵀ
        b_dd2 = tl.zeros([BT, BV], dtype=tl.float32)
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        dwv, dbeta = tl.zeros([BT], dtype=tl.float32), tl.zeros([BT], dtype=tl.float32)
        dhv, dcv = tl.zeros([BT], dtype=tl.float32), tl.zeros([BT], dtype=tl.float32)
        depsv = tl.zeros([BT], dtype=tl.float32)  # dL/dε, nonzero at row n only
        for i_n in range(tl.cdiv(DN, BN)):
            sums = _mlp_bwd_sum_tile(
                b_q, b_k, b_do, b_d2, b_gc1, b_dg2, w1s, w2s, s1s, s2s, dw1, dw2, ds1, ds2,
                c1, c2, rd1, rd2, i_n, is_n, beta, cvec, w_end, h_end,
                DK, DN, DV, BK, BN, BV, MOM, PREC,
            )  # fmt: skip
            b_g2 += sums[0]
            b_hd += sums[1]
            b_dd2 += sums[2]
            b_dq += sums[3]
            b_dk += sums[4]
            dwv += sums[5]
            dbeta += sums[6]
            dhv += sums[7]
            dcv += sums[8]
            depsv += sums[9]
        b_dp = 2.0 * (b_dd2 - _mm(tl.trans(b_g2 * cmat), b_do, PREC))

        # pass 3: per-tile gradients of the chunk-start state, and dk through the keys' forward
        for i_n in range(tl.cdiv(DN, BN)):
            b_dk += _mlp_bwd_state_tile(
                b_q, b_k, b_do, b_d2, b_gc1, b_dg2, b_dp, w1s, w2s, s1s, s2s, dw1, dw2, ds1, ds2,
                c1, c2, rd1, rd2, wr1, wr2, i_n, beta, cvec, w_end, h_end, beta_n, c_n, eps_n,
                DK, DN, DV, BK, BN, BV, MOM, PREC,
            )  # fmt: skip
        _mlp_bwd_finish(
            dq, dk, dv, dth, dlk, dle, b_q, b_k, b_do, b_dyd2, b_g1, b_g2, b_hd, b_dq, b_dk, b_dp,
            dwv, dbeta, dhv, dcv, depsv, co, i_g, L, i_c, chunk, n_t,
            DK, DV, BT, BK, BV, MOM, RESIDUAL, PREC,
        )  # fmt: skip
        tl.debug_barrier()  # the next chunk reads the dstate other threads just stored


# ---- depth 2, split: the hidden width across programs, three launches per chunk ----
# The walking kernels run one program per (batch, head): a step costs one SM's latency per
# chunk, whatever the GPU. Here each hidden tile of BN columns is a program (grid (S, G), S =
# cdiv(DN, BN)) and what sums over the hidden width goes through small per-tile partial
# buffers, reduced by the next launch: launch boundaries are the only synchronisation, so the
# interpreter checks these kernels exactly as it runs them. Partial buffers are fp32
# (2, G, S, BT, BV | BK | BT) tiles, unmasked (padding stays zero), in two slots by chunk
# parity: a launch reads one chunk's partials while it writes the next one's.
#   forward, one launch per chunk c: δ2(c) from the M(k) partials, each tile's state update
#     and y partial, then the tile's M(k) partial of chunk c + 1 at its new weights; program 0
#     also keeps δ2(c) for the backward and sums chunk c - 1's y partials.
#   backward, two launches per chunk c (reverse): pass-2 partials of c (and, in one extra
#     program column, chunk c + 1's input gradients from its partials); then pass 3 of c.


@triton.jit
def _tile_ptrs(i_g, i_s, S, R: tl.constexpr, C: tl.constexpr):
    """Offsets of partial tile (i_g, i_s) in a (G, S, R, C) buffer (slot s: i_g + s G)."""
    o_r, o_c = tl.arange(0, R), tl.arange(0, C)
    return ((i_g * S + i_s) * R + o_r)[:, None] * C + o_c[None, :]


@triton.jit
def _tile_sum(buf, i_g, S, R: tl.constexpr, C: tl.constexpr):
    """Σ over the S partial tiles of group i_g in a (G, S, R, C) buffer."""
    acc = tl.zeros([R, C], dtype=tl.float32)
    for i_s in range(S):
        acc += tl.load(buf + _tile_ptrs(i_g, i_s, S, R, C))
    return acc


@triton.jit
def _d2_ptrs(i_g, i_c, NT, BT: tl.constexpr, BV: tl.constexpr):
    """Offsets of chunk i_c's δ2 tile in the (G, NT, BT, BV) buffer the forward keeps."""
    o_t, o_v = tl.arange(0, BT), tl.arange(0, BV)
    return ((i_g * NT + i_c) * BT + o_t)[:, None] * BV + o_v[None, :]


@triton.jit
def _split_y(
    yp, slot, q, y, i_g, L, i_c, chunk, S, DK: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, RESIDUAL: tl.constexpr,
):  # fmt: skip
    """y of chunk i_c = Σ of its tiles' partials (buffer slot `slot`) [+ q]."""
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    t0 = i_c * chunk
    m_t = o_t < tl.minimum(L - t0, chunk)
    row = i_g * L + t0 + o_t
    b_y = _tile_sum(yp, slot, S, BT, BV)
    if RESIDUAL:
        m_tq = m_t[:, None] & (o_k < DK)[None, :]
        b_y += tl.load(q + row[:, None] * DK + o_k[None, :], mask=m_tq, other=0.0)
    tl.store(y + row[:, None] * DV + o_v[None, :], b_y, mask=m_t[:, None] & (o_v < DV)[None, :])


@triton.jit(do_not_specialize=["i_c"])
def _mlp_part_kernel(
    q, k, w1s, w2s, pd, yp, y, L, NT, chunk, i_c, S,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
    RESIDUAL: tl.constexpr, REDUCE_Y: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Chunk i_c's partial M(k) for hidden tile n at the chunk-start weights (i_c < NT); with
    REDUCE_Y, program 0 also sums chunk i_c - 1's y partials (yp) into y."""
    i_n, i_g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    m_k = o_k < DK
    if i_c < NT:
        t0 = i_c * chunk
        m_t = o_t < tl.minimum(L - t0, chunk)
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + (i_g * L + t0 + o_t)[:, None] * DK + o_k[None, :], mask=m_tk, other=0.0)
        c1 = (i_g * (NT + 1) + i_c) * DK * DN
        c2 = (i_g * (NT + 1) + i_c) * DN * DV
        b_p = _mlp_part(b_k, w1s, w2s, c1, c2, i_n, DK, DN, DV, BK, BN, BV, PREC)
        tl.store(pd + _tile_ptrs(i_g, i_n, S, BT, BV), b_p)
    if REDUCE_Y:
        if (i_n == 0) & (i_c > 0):
            _split_y(yp, i_g, q, y, i_g, L, i_c - 1, chunk, S, DK, DV, BT, BK, BV, RESIDUAL)


@triton.jit(do_not_specialize=["i_c"])
def _mlp_split_fwd_kernel(
    q, k, v, th, lk, le, w1s, w2s, s1s, s2s, pd, yp, d2s, y, G, L, NT, chunk, i_c, S,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, RESIDUAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Chunk i_c, hidden tile n: the tile's chunk-end state (slot i_c + 1), its y partial and
    its M(k) partial of chunk i_c + 1; program 0 keeps δ2 and sums chunk i_c - 1's y."""
    i_n, i_g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    cur, nxt = (i_c % 2) * G + i_g, ((i_c + 1) % 2) * G + i_g  # partial-buffer slots
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    m_k = o_k < DK
    b_q, b_k, b_v, _u1, n_t, co = _chunk_rows(
        q, k, v, v, th, lk, le, i_g, L, i_c, chunk, DK, DV, BT, BK, BV, MOM, False, PREC
    )
    _u2, beta, _u3, _u4, _u5, _u6, cmat, cvec, w_end, h_end, beta_n, c_n, eps_n = co
    c1, c2 = (i_g * (NT + 1) + i_c) * DK * DN, (i_g * (NT + 1) + i_c) * DN * DV
    b_p = _tile_sum(pd, cur, S, BT, BV)
    if RESIDUAL:
        b_p += b_k
    b_d2 = 2.0 * (b_p - b_v)
    if i_n == 0:
        tl.store(d2s + _d2_ptrs(i_g, i_c, NT, BT, BV), b_d2)
        if i_c > 0:  # chunk i_c - 1's y: its partials are complete since the last launch
            _split_y(yp, nxt, q, y, i_g, L, i_c - 1, chunk, S, DK, DV, BT, BK, BV, RESIDUAL)
    b_gc1 = _mm(b_q, tl.trans(b_k), PREC) * cmat
    b_y, b_g2, b_w1n, b_w2n = _mlp_fwd_tile(
        b_q, b_k, b_d2, b_gc1, w1s, w2s, s1s, s2s, c1, c2, i_n,
        beta, cvec, w_end, h_end, beta_n, c_n, eps_n, DK, DN, DV, BK, BN, BV, MOM, PREC,
    )  # fmt: skip
    tl.store(yp + _tile_ptrs(cur, i_n, S, BT, BV), b_y - _mm(b_g2 * cmat, b_d2, PREC))
    if i_c + 1 < NT:  # the next chunk's M(k) partial, at this tile's new weights
        t1 = (i_c + 1) * chunk
        m_t1 = o_t < tl.minimum(L - t1, chunk)
        m_tk1 = m_t1[:, None] & m_k[None, :]
        b_k1 = tl.load(k + (i_g * L + t1 + o_t)[:, None] * DK + o_k[None, :], mask=m_tk1, other=0.0)
        b_a1, _u7 = _gelu_pair(_mm(b_k1, b_w1n, PREC))
        tl.store(pd + _tile_ptrs(nxt, i_n, S, BT, BV), _mm(b_a1, b_w2n, PREC))


@triton.jit
def _split_dp(dd2p, g2p, b_do, cmat, i_g, S, BT: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr):  # fmt: skip
    """dL/dp = 2 dL/dδ2 from the pass-2 partials (Σ dd2 - ((Σ G2) ⊙ C)ᵀ dy), and Σ G2."""
    b_g2 = _tile_sum(g2p, i_g, S, BT, BT)
    b_dd2 = _tile_sum(dd2p, i_g, S, BT, BV) - _mm(tl.trans(b_g2 * cmat), b_do, PREC)
    return 2.0 * b_dd2, b_g2


@triton.jit
def _row(tile, r: tl.constexpr, R: tl.constexpr):
    """Row r of an (R, C) tile as a vector."""
    return tl.sum(tl.where(tl.arange(0, R)[:, None] == r, tile, 0.0), axis=0)


@triton.jit
def _split_bwd_out(
    q, k, v, th, lk, le, dy, d2s, g2p, hdp, dd2p, dqp, dkp, vp, dq, dk, dv, dth, dlk, dle,
    i_g, slot, L, NT, chunk, i_c, S,
    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, RESIDUAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Chunk i_c's input gradients from its tiles' partials (partial-buffer slot `slot`)."""
    b_q, b_k, b_v, b_do, n_t, co = _chunk_rows(
        q, k, v, dy, th, lk, le, i_g, L, i_c, chunk, DK, DV, BT, BK, BV, MOM, True, PREC
    )
    b_d2 = tl.load(d2s + _d2_ptrs(i_g, i_c, NT, BT, BV))
    b_dp, b_g2 = _split_dp(dd2p, g2p, b_do, co[6], slot, S, BT, BV, PREC)
    vecs = _tile_sum(vp, slot, S, 8, BT)
    _mlp_bwd_finish(
        dq, dk, dv, dth, dlk, dle, b_q, b_k, b_do, _mm(b_do, tl.trans(b_d2), PREC),
        _mm(b_q, tl.trans(b_k), PREC), b_g2, _tile_sum(hdp, slot, S, BT, BT),
        _tile_sum(dqp, slot, S, BT, BK), _tile_sum(dkp, slot, S, BT, BK), b_dp,
        _row(vecs, 0, 8), _row(vecs, 1, 8), _row(vecs, 2, 8), _row(vecs, 3, 8), _row(vecs, 4, 8),
        co, i_g, L, i_c, chunk, n_t, DK, DV, BT, BK, BV, MOM, RESIDUAL, PREC,
    )  # fmt: skip


@triton.jit(do_not_specialize=["i_c", "i_r"])
def _mlp_split_bwd_sum_kernel(
    q, k, v, th, lk, le, w1s, w2s, s1s, s2s, dy, dw1, dw2, ds1, ds2,
    d2s, g2p, hdp, dd2p, dqp, dkp, vp, dq, dk, dv, dth, dlk, dle, G, L, NT, chunk, i_c, i_r, S,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, RESIDUAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Programs n < S: backward pass 2 of chunk i_c for hidden tile n, stored as partials in
    slot i_c % 2. Program column S: chunk i_c + 1's input gradients (its partials, the other
    slot, are complete: its pass 3 ran in the previous launch)."""
    i_n, i_g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n1, n2 = DK * DN, DN * DV
    cur, nxt = (i_c % 2) * G + i_g, ((i_c + 1) % 2) * G + i_g
    if i_n < S:
        b_q, b_k, b_v, b_do, n_t, co = _chunk_rows(
            q, k, v, dy, th, lk, le, i_g, L, i_c, chunk, DK, DV, BT, BK, BV, MOM, True, PREC
        )
        _u1, beta, _u2, _u3, _u4, _u5, cmat, cvec, w_end, h_end, _u6, _u7, _u8 = co
        c1, c2 = (i_g * (NT + 1) + i_c) * n1, (i_g * (NT + 1) + i_c) * n2
        rd1, rd2 = (2 * i_g + i_r % 2) * n1, (2 * i_g + i_r % 2) * n2
        b_d2 = tl.load(d2s + _d2_ptrs(i_g, i_c, NT, BT, BV))
        b_gc1 = _mm(b_q, tl.trans(b_k), PREC) * cmat
        b_dg2 = -_mm(b_do, tl.trans(b_d2), PREC) * cmat
        sums = _mlp_bwd_sum_tile(
            b_q, b_k, b_do, b_d2, b_gc1, b_dg2, w1s, w2s, s1s, s2s, dw1, dw2, ds1, ds2,
            c1, c2, rd1, rd2, i_n, tl.arange(0, BT) == n_t - 1, beta, cvec, w_end, h_end,
            DK, DN, DV, BK, BN, BV, MOM, PREC,
        )  # fmt: skip
        b_g2, b_hd, b_dd2, b_dq, b_dk, dwv, dbeta, dhv, dcv, depsv = sums
        tl.store(g2p + _tile_ptrs(cur, i_n, S, BT, BT), b_g2)
        tl.store(hdp + _tile_ptrs(cur, i_n, S, BT, BT), b_hd)
        tl.store(dd2p + _tile_ptrs(cur, i_n, S, BT, BV), b_dd2)
        tl.store(dqp + _tile_ptrs(cur, i_n, S, BT, BK), b_dq)
        tl.store(dkp + _tile_ptrs(cur, i_n, S, BT, BK), b_dk)
        o_r = tl.arange(0, 8)[:, None]
        vecs = tl.where(o_r == 0, dwv[None, :], tl.where(o_r == 1, dbeta[None, :], 0.0))
        vecs = tl.where(o_r == 2, dhv[None, :], tl.where(o_r == 3, dcv[None, :], vecs))
        vecs = tl.where(o_r == 4, depsv[None, :], vecs)
        tl.store(vp + _tile_ptrs(cur, i_n, S, 8, BT), vecs)
    elif i_c + 1 < NT:
        _split_bwd_out(
            q, k, v, th, lk, le, dy, d2s, g2p, hdp, dd2p, dqp, dkp, vp, dq, dk, dv, dth, dlk, dle,
            i_g, nxt, L, NT, chunk, i_c + 1, S, DK, DV, BT, BK, BV, MOM, RESIDUAL, PREC,
        )  # fmt: skip


@triton.jit(do_not_specialize=["i_c", "i_r"])
def _mlp_split_bwd_state_kernel(
    q, k, v, th, lk, le, w1s, w2s, s1s, s2s, dy, dw1, dw2, ds1, ds2,
    d2s, g2p, dd2p, dkp, G, L, NT, chunk, i_c, i_r, S,
    DK: tl.constexpr, DN: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, RESIDUAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Backward pass 3 of chunk i_c for hidden tile n: the tile of dL/d(chunk-start state)
    into the other dstate slot, and the tile's dk term (added to its pass-2 dk partial)."""
    i_n, i_g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n1, n2 = DK * DN, DN * DV
    cur = (i_c % 2) * G + i_g
    b_q, b_k, b_v, b_do, n_t, co = _chunk_rows(
        q, k, v, dy, th, lk, le, i_g, L, i_c, chunk, DK, DV, BT, BK, BV, MOM, True, PREC
    )
    _u1, beta, _u2, _u3, _u4, _u5, cmat, cvec, w_end, h_end, beta_n, c_n, eps_n = co
    c1, c2 = (i_g * (NT + 1) + i_c) * n1, (i_g * (NT + 1) + i_c) * n2
    rd1, rd2 = (2 * i_g + i_r % 2) * n1, (2 * i_g + i_r % 2) * n2
    wr1, wr2 = (2 * i_g + (i_r + 1) % 2) * n1, (2 * i_g + (i_r + 1) % 2) * n2
    b_d2 = tl.load(d2s + _d2_ptrs(i_g, i_c, NT, BT, BV))
    b_gc1 = _mm(b_q, tl.trans(b_k), PREC) * cmat
    b_dg2 = -_mm(b_do, tl.trans(b_d2), PREC) * cmat
    b_dp, _u9 = _split_dp(dd2p, g2p, b_do, cmat, cur, S, BT, BV, PREC)
    b_dk = _mlp_bwd_state_tile(
        b_q, b_k, b_do, b_d2, b_gc1, b_dg2, b_dp, w1s, w2s, s1s, s2s, dw1, dw2, ds1, ds2,
        c1, c2, rd1, rd2, wr1, wr2, i_n, beta, cvec, w_end, h_end, beta_n, c_n, eps_n,
        DK, DN, DV, BK, BN, BV, MOM, PREC,
    )  # fmt: skip
    p_dk = dkp + _tile_ptrs(cur, i_n, S, BT, BK)
    tl.store(p_dk, tl.load(p_dk) + b_dk)


@triton.jit
def _mlp_split_bwd_out_kernel(
    q, k, v, th, lk, le, dy, d2s, g2p, hdp, dd2p, dqp, dkp, vp, dq, dk, dv, dth, dlk, dle,
    L, NT, chunk, S,
    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MOM: tl.constexpr, RESIDUAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Chunk 0's input gradients (slot 0): the last step of the backward, one program a group."""
    i_g = tl.program_id(1).to(tl.int64)
    _split_bwd_out(
        q, k, v, th, lk, le, dy, d2s, g2p, hdp, dd2p, dqp, dkp, vp, dq, dk, dv, dth, dlk, dle,
        i_g, i_g, L, NT, chunk, 0, S, DK, DV, BT, BK, BV, MOM, RESIDUAL, PREC,
    )  # fmt: skip
