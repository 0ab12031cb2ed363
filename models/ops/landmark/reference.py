"""Landmark grouped softmax, dense and row by row: the oracle for ``grouped.py``.

Legend: ... leading dims (B, H), L tokens (queries = keys), F = mem_freq, D head dim.

Layout (docs/models.md, Landmark; epfml/landmark-attention): the sequence is cut into sections of
F + 1 positions, F ordinary tokens followed by one landmark token; section of position p is
p // (F + 1) and p is a landmark iff p % (F + 1) == F. The last section may be incomplete.

Weights of query i in section b (causal, keys j <= i):
- top softmax over {ordinary tokens of section b up to i} + {landmarks of sections c < b};
- each earlier section c < b: a softmax over its F ordinary tokens (its group);
- P[i, j] = p_top(j) for j in the current section; p_top(landmark_c) * p_group_c(j) for j in
  section c < b; 0 for every landmark column (landmarks gate their block, their values are
  never mixed in) and for future keys. Each row sums to 1.
- A landmark *query* (i is the landmark of section b) is treated like the ordinary tokens of
  its section: its own landmark key is excluded (as in epfml's "the landmark token for the
  current block should be ignored, even if we are processing the landmark token itself"),
  so it sees the F tokens it closes plus the earlier landmarks/groups.
"""

from __future__ import annotations

import torch


def landmark_softmax_reference(scores: torch.Tensor, mem_freq: int) -> torch.Tensor:
    """Grouped landmark softmax of scores (..., L, L) [query, key]; returns P (..., L, L) fp32."""
    L = scores.shape[-1]
    if scores.shape[-2] != L:
        raise ValueError(f"scores must be square over (query, key); got {tuple(scores.shape)}")
    x = scores.float()
    S = mem_freq + 1
    zero = x.new_zeros(*x.shape[:-2], 1)
    rows = []
    for i in range(L):
        b, xi = i // S, x[..., i, :]  # slice the row once: cheap slicing below (and backward)
        current = xi[..., b * S : (i if i % S == mem_freq else i + 1)]  # own landmark hidden
        landmarks = xi[..., mem_freq : b * S : S]
        p_top = torch.softmax(torch.cat([current, landmarks], dim=-1), dim=-1)
        n_cur = current.shape[-1]
        pieces = []  # the row's weights in key order; landmark columns are 0
        for c in range(b):
            p_group = torch.softmax(xi[..., c * S : c * S + mem_freq], dim=-1)
            pieces += [p_top[..., n_cur + c, None] * p_group, zero]
        pieces.append(p_top[..., :n_cur])
        pieces.append(x.new_zeros(*x.shape[:-2], L - b * S - n_cur))  # own landmark, future
        rows.append(torch.cat(pieces, dim=-1))
    return torch.stack(rows, dim=-2)


def landmark_attention_reference(
    q_BHLD: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLD: torch.Tensor,
    mem_freq: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention with landmark grouped softmax: P(scale q k^T) v, fp32 inside."""
    scale = q_BHLD.shape[-1] ** -0.5 if scale is None else scale
    scores = (q_BHLD.float() * scale) @ k_BHLD.float().transpose(-1, -2)
    return (landmark_softmax_reference(scores, mem_freq) @ v_BHLD.float()).to(v_BHLD.dtype)
