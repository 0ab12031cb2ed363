"""Landmark grouped softmax, vectorised, with a hand-written backward.

Legend: ... leading dims (B, H), L tokens, F = mem_freq, S = F + 1 section length,
NB = ceil(L / S) sections; "group view" = keys padded to NB * S and viewed as (NB, S).
Semantics (current section, landmark queries, zero landmark columns) are those documented
in ``reference.py``. Instead of epfml's scatter by group index, the fixed layout lets the
per-group softmax be one softmax over the last axis of the (..., L, NB, S) group view.

Backward. With a_c = p_top(landmark_c), r_c = sum_{j in group c} p_group_c(j) dP_ij and
delta_i = sum_j P_ij dP_ij (the same delta as flash attention, because sum_c a_c r_c plus
the current-section terms is exactly sum_j P_ij dP_ij):
    current-section token j: dx_ij = P_ij (dP_ij - delta_i)
    landmark of section c:   dx_ij = a_c (r_c - delta_i)
    token j of section c:    dx_ij = P_ij (dP_ij - r_c)
It saves the two softmaxes (p_top and the group probabilities), not the autograd graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import landmark_mask


def _layout(L: int, mem_freq: int, device: torch.device):
    """Masks: current (L, L), top (L, L), valid groups (L, NB, S); and NB."""
    S = mem_freq + 1
    pos = torch.arange(L, device=device)
    section = pos // S
    is_lm = landmark_mask(L, mem_freq, device)
    same = section[None, :] == section[:, None]
    earlier = section[None, :] < section[:, None]
    current = same & ~is_lm[None, :] & (pos[None, :] <= pos[:, None])
    top = current | (is_lm[None, :] & earlier)
    nb = math.ceil(L / S)
    c, t = torch.arange(nb, device=device), torch.arange(S, device=device)
    groups = (c[None, :, None] < section[:, None, None]) & (t[None, None, :] < mem_freq)
    return current, top, groups, nb


def _softmax_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; an all -inf row (an empty group) gives zeros, not NaN."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(x - m)
    s = e.sum(-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def _group_view(t: torch.Tensor, nb: int, S: int, fill: float) -> torch.Tensor:
    L = t.shape[-1]
    return F.pad(t, (0, nb * S - L), value=fill).unflatten(-1, (nb, S))


def _combine(p_top, p_group, current, nb, S, mem_freq):
    """P from the two softmaxes; also returns a_c = p_top at each section's landmark."""
    L = p_top.shape[-1]
    a = _group_view(p_top, nb, S, 0.0)[..., mem_freq]
    grouped = (p_group * a[..., None]).flatten(-2)[..., :L]
    return torch.where(current, p_top, 0.0) + grouped, a


class _LandmarkSoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mem_freq):
        x = scores.float()
        L, S = x.shape[-1], mem_freq + 1
        current, top, groups, nb = _layout(L, mem_freq, x.device)
        p_top = torch.softmax(x.masked_fill(~top, float("-inf")), dim=-1)
        x_groups = _group_view(x, nb, S, float("-inf")).masked_fill(~groups, float("-inf"))
        p_group = _softmax_or_zero(x_groups)
        P, _ = _combine(p_top, p_group, current, nb, S, mem_freq)
        ctx.save_for_backward(p_top, p_group)
        ctx.mem_freq, ctx.in_dtype = mem_freq, scores.dtype
        return P.to(scores.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dP):
        p_top, p_group = ctx.saved_tensors
        mem_freq = ctx.mem_freq
        L, S = p_top.shape[-1], mem_freq + 1
        current, _, _, nb = _layout(L, mem_freq, p_top.device)
        dP = dP.float()
        P, a = _combine(p_top, p_group, current, nb, S, mem_freq)
        delta = (P * dP).sum(-1, keepdim=True)
        dP_groups = _group_view(dP, nb, S, 0.0)
        r = (p_group * dP_groups).sum(-1)
        dx_groups = p_group * a[..., None] * (dP_groups - r[..., None])
        dx_groups[..., mem_freq] = a * (r - delta)  # landmark columns: zero p_group there
        dx = torch.where(current, p_top * (dP - delta), 0.0) + dx_groups.flatten(-2)[..., :L]
        return dx.to(ctx.in_dtype), None


def landmark_softmax(scores: torch.Tensor, mem_freq: int) -> torch.Tensor:
    """Grouped landmark softmax of scores (..., L, L) [query, key], causal; P in scores' dtype."""
    L = scores.shape[-1]
    if scores.dim() < 2 or scores.shape[-2] != L:
        raise ValueError(f"scores must be square over (query, key); got {tuple(scores.shape)}")
    if mem_freq < 1:
        raise ValueError(f"mem_freq must be >= 1; got {mem_freq}")
    return _LandmarkSoftmaxFn.apply(scores, mem_freq)


def landmark_attention(
    q_BHLD: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLD: torch.Tensor,
    mem_freq: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal landmark attention P(scale q k^T) v over a sequence laid out as in reference.py.

    q, k (B, H, L, D), v (B, H, L, Dv); the landmark tokens sit at positions p with
    p % (mem_freq + 1) == mem_freq. O(L^2) memory (dense scores), fp32 inside.
    """
    if not (q_BHLD.shape[:-1] == k_BHLD.shape[:-1] == v_BHLD.shape[:-1]):
        raise ValueError(
            f"q, k, v must share (B, H, L); got {tuple(q_BHLD.shape)}, {tuple(k_BHLD.shape)}, "
            f"{tuple(v_BHLD.shape)}"
        )
    scale = q_BHLD.shape[-1] ** -0.5 if scale is None else scale
    scores = (q_BHLD.float() * scale) @ k_BHLD.float().transpose(-1, -2)
    return (landmark_softmax(scores, mem_freq) @ v_BHLD.float()).to(v_BHLD.dtype)
