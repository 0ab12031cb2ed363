"""Sequential scans in fp32, one step at a time: the oracles for ``parallel.py``.

Legend: ... any leading dims (B or B, H), L time (always dim -2 of x / v), D features.
- Linear recurrence h_t = a_t * h_{t-1} + x_t (elementwise), h_{-1} = h0 or 0.
- Aaren (docs/models.md, Aaren): the softmax attention of one query over tokens 1..k as an RNN
  with state (m, u, w): m = running max of the scores s, u = sum exp(s_i - m),
  w = sum exp(s_i - m) v_i, output o_k = w_k / u_k. A score of -inf is an ignored token.
"""

from __future__ import annotations

import torch


def linear_scan_reference(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None
) -> torch.Tensor:
    """h_t = a_t h_{t-1} + x_t over dim -2; a, x (..., L, D), h0 (..., D); returns h (..., L, D)."""
    if a.shape != x.shape:
        raise ValueError(
            f"a and x must have the same shape; got {tuple(a.shape)}, {tuple(x.shape)}"
        )
    h = torch.zeros_like(x[..., 0, :], dtype=torch.float32) if h0 is None else h0.float()
    out = []
    for t in range(x.shape[-2]):
        h = a[..., t, :].float() * h + x[..., t, :].float()
        out.append(h)
    return torch.stack(out, dim=-2).to(x.dtype)


def aaren_scan_reference(
    s: torch.Tensor,
    v: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Prefix softmax attention o_k = sum_{i<=k} softmax(s)_i v_i by the (m, u, w) recurrence.

    s (..., L) scores, v (..., L, D); initial_state (m (...), u (...), w (..., D)) summarises
    earlier tokens. Returns o (..., L, D) and the final (m, u, w), all fp32.
    """
    if s.shape != v.shape[:-1]:
        raise ValueError(f"s must be v's shape without D; got {tuple(s.shape)}, {tuple(v.shape)}")
    s, v = s.float(), v.float()
    if initial_state is None:
        m = torch.full_like(s[..., 0], float("-inf"))
        u = torch.zeros_like(s[..., 0])
        w = torch.zeros_like(v[..., 0, :])
    else:
        m, u, w = (t.float() for t in initial_state)
    out = []
    for t in range(s.shape[-1]):
        m_new = torch.maximum(m, s[..., t])
        # all scores so far -inf: nothing seen yet, keep shifts finite
        shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        carry, fresh = torch.exp(m - shift), torch.exp(s[..., t] - shift)
        u = u * carry + fresh
        w = w * carry[..., None] + fresh[..., None] * v[..., t, :]
        m = m_new
        out.append(w / u[..., None])
    return torch.stack(out, dim=-2), (m, u, w)
