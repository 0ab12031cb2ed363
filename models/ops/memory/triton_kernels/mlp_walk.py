"""Depth-2 memory kernels, walking: one program per (batch, head), grid (G,), walks the
hidden width in BN tiles with the state in global memory. The backward recomputes each chunk
from its saved start state in three passes over the tiles (δ2; then everything that sums over
the hidden width; then the per-tile weight gradients) and ping-pongs dstate in a 2-slot buffer.
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
from models.ops.memory.triton_kernels.primitives import _mm


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
