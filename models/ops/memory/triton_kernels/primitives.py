"""Device functions every memory kernel uses: dots, the exact GELU and its derivatives, and
one chunk's decay / momentum coefficients with their backward (package docstring: legend)."""

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
def _gelu_dd(x):
    """gelu''(x) = φ(x) (2 - x²): the derivative of gelu' that δ1 = (δ2 W2ᵀ) ⊙ gelu'(z) has."""
    return tl.exp(-0.5 * x * x) * 0.3989422804014327 * (2.0 - x * x)
