"""Parallel prefix scans (Hillis-Steele, O(log L) depth) for linear recurrences and Aaren.

Legend: ... leading dims (B or B, H), L time (dim -2 of x / v, dim -1 of s), D features.
Hillis-Steele does O(L log L) work in log2(L) vectorised steps; on a GPU that is the depth
that matters, and here it keeps the code to a few tensor ops with no Python loop over time.

Linear recurrence h_t = a_t h_{t-1} + x_t: the pairs (A, X) compose as
(A1, X1) then (A2, X2) = (A1 A2, A2 X1 + X2). Only products, never division, so a_t = 0
(a reset) and negative a_t are exact; an underflowing product is a genuinely vanished term.
The backward is the same scan run in reverse (g_t = dh_t + a_{t+1} g_{t+1}), so it stores
only a, h and h0 instead of the log2(L) intermediate levels autograd would keep.

Aaren (docs/models.md, Aaren): (m, u, w) with the max-shifted associative operator. Leaves are
(s_i, 1, v_i) written as m_i = s_i.detach(), u_i = exp(s_i - m_i): the shift is a constant for
autograd (o = w / u does not depend on it), so gradients reach s only through u and w.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _scan_pairs(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of (a, x) over dim -2: returns (prod_{s<=t} a_s, h_t with h_{-1} = 0)."""
    A, X = a, x
    L, d = x.shape[-2], 1
    while d < L:
        X = torch.cat([X[..., :d, :], A[..., d:, :] * X[..., :-d, :] + X[..., d:, :]], dim=-2)
        A = torch.cat([A[..., :d, :], A[..., d:, :] * A[..., :-d, :]], dim=-2)
        d *= 2
    return A, X


class _LinearScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, h0):
        A, h = _scan_pairs(a, x)
        if h0 is not None:
            h = h + A * h0[..., None, :]
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        # g_t = dL/dh_t in total: g_t = dh_t + a_{t+1} g_{t+1}, a reversed linear scan
        a_next = torch.cat([a[..., 1:, :], torch.zeros_like(a[..., :1, :])], dim=-2)
        _, g = _scan_pairs(a_next.flip(-2), dh.flip(-2))
        g = g.flip(-2)
        first = torch.zeros_like(h[..., :1, :]) if h0 is None else h0[..., None, :]
        h_prev = torch.cat([first, h[..., :-1, :]], dim=-2)
        dh0 = None if h0 is None else a[..., 0, :] * g[..., 0, :]
        return g * h_prev, g, dh0


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = a_t h_{t-1} + x_t over dim -2 by a parallel prefix scan.

    a, x (..., L, D) (e.g. (B, L, D) or (B, H, L, D)); h0 (..., D) or None for zeros.
    Returns h (..., L, D) in x's dtype (computed in fp32); the last state is h[..., -1, :].
    """
    if a.shape != x.shape:
        raise ValueError(
            f"a and x must have the same shape; got {tuple(a.shape)}, {tuple(x.shape)}"
        )
    if h0 is not None and h0.shape != x.shape[:-2] + x.shape[-1:]:
        raise ValueError(f"h0 must be {tuple(x.shape[:-2] + x.shape[-1:])}; got {tuple(h0.shape)}")
    h = _LinearScanFn.apply(a.float(), x.float(), None if h0 is None else h0.float())
    return h.to(x.dtype)


class AarenState(NamedTuple):
    """Running softmax summary: m (...) max score, u (...) sum of exp(s - m), w (..., D)."""

    m: torch.Tensor
    u: torch.Tensor
    w: torch.Tensor


def aaren_combine(first: AarenState, second: AarenState) -> AarenState:
    """The associative operator: the summary of ``first``'s tokens followed by ``second``'s."""
    m = torch.maximum(first.m, second.m)
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # both empty: stay finite
    e1, e2 = torch.exp(first.m - shift), torch.exp(second.m - shift)
    return AarenState(
        m, first.u * e1 + second.u * e2, first.w * e1[..., None] + second.w * e2[..., None]
    )


def _leaves(s: torch.Tensor, v: torch.Tensor) -> AarenState:
    m = s.detach()
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    u = torch.exp(s - shift)  # 1 with d/ds = 1, or 0 for a -inf (ignored) token
    return AarenState(m, u, u[..., None] * v)


def aaren_scan(
    s: torch.Tensor, v: torch.Tensor, initial_state: AarenState | None = None
) -> tuple[torch.Tensor, AarenState]:
    """All prefix outputs o_k = w_k / u_k of Aaren's attention-as-RNN in O(log L) depth.

    s (..., L) scores q.k_i, v (..., L, D); initial_state summarises earlier tokens. Returns
    o (..., L, D) in v's dtype and the final AarenState (fp32) to continue from.
    """
    if s.shape != v.shape[:-1]:
        raise ValueError(f"s must be v's shape without D; got {tuple(s.shape)}, {tuple(v.shape)}")
    m, u, w = _leaves(s.float(), v.float())
    L, d = s.shape[-1], 1
    while d < L:
        prev = AarenState(m[..., :-d], u[..., :-d], w[..., :-d, :])
        cur = AarenState(m[..., d:], u[..., d:], w[..., d:, :])
        c = aaren_combine(prev, cur)
        m = torch.cat([m[..., :d], c.m], dim=-1)
        u = torch.cat([u[..., :d], c.u], dim=-1)
        w = torch.cat([w[..., :d, :], c.w], dim=-2)
        d *= 2
    if initial_state is not None:
        m0, u0, w0 = (t.float() for t in initial_state)
        m, u, w = aaren_combine(
            AarenState(m0[..., None], u0[..., None], w0[..., None, :]), AarenState(m, u, w)
        )
    o = w / u[..., None]
    return o.to(v.dtype), AarenState(m[..., -1], u[..., -1], w[..., -1, :])


def aaren_step(
    state: AarenState | None, s_t: torch.Tensor, v_t: torch.Tensor
) -> tuple[torch.Tensor, AarenState]:
    """One RNN step in O(1) memory: s_t (...), v_t (..., D) -> (o_t (..., D), new state)."""
    leaf = _leaves(s_t.float(), v_t.float())
    new = leaf if state is None else aaren_combine(state, leaf)
    return (new.w / new.u[..., None]).to(v_t.dtype), new
