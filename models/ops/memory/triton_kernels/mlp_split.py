"""Depth-2 memory kernels, split: the hidden width across programs, grid (hidden tiles, G),
launched per chunk (one forward launch, two backward).

The walking kernels run one program per (batch, head): a step costs one SM's latency per
chunk, whatever the GPU. Here each hidden tile of BN columns is a program (grid (S, G), S =
cdiv(DN, BN)) and what sums over the hidden width goes through small per-tile partial
buffers, reduced by the next launch: launch boundaries are the only synchronisation, so the
interpreter checks these kernels exactly as it runs them. Partial buffers are fp32
(2, G, S, BT, BV | BK | BT) tiles, unmasked (padding stays zero), in two slots by chunk
parity: a launch reads one chunk's partials while it writes the next one's.
  forward, one launch per chunk c: δ2(c) from the M(k) partials, each tile's state update
    and y partial, then the tile's M(k) partial of chunk c + 1 at its new weights; program 0
    also keeps δ2(c) for the backward and sums chunk c - 1's y partials.
  backward, two launches per chunk c (reverse): pass-2 partials of c (and, in one extra
    program column, chunk c + 1's input gradients from its partials); then pass 3 of c.
"""

from __future__ import annotations

import triton
import triton.language as tl

from models.ops.memory.triton_kernels.mlp_tiles import (
    _chunk_rows,
    _mlp_bwd_finish,
    _mlp_bwd_state_tile,
    _mlp_bwd_sum_tile,
    _mlp_fwd_tile,
    _mlp_part,
)
from models.ops.memory.triton_kernels.primitives import _gelu_pair, _mm


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
