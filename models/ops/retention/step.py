"""RetNet retention, one decoding step: the next token from the carried state, in fp32.

Legend: B batch, H heads, K key dim, V value dim. The production form of recurrent decoding
(RetNet's 1-token steps); the token loop in ``reference.py`` is the oracle it is tested
against, bitwise: the same operations in the same order, written apart so that the oracle
stays independent of the path the models run. Conventions (scale, normalisations, state
layout, offset): ``reference.py``'s docstring.
"""

from __future__ import annotations

import torch

from .common import check_retention_inputs, decay_row_sums


def retention_step(
    q_BH1K: torch.Tensor,
    k_BH1K: torch.Tensor,
    v_BH1V: torch.Tensor,
    decay_H: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    offset: int = 0,
    normalize_decay: bool = False,
    normalize_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S = gamma S_prev + k^T v, o = q S for one token (L = 1) after `offset` earlier ones.

    Returns (o (B, H, 1, V) in v's dtype, the new state fp32 (B, H, K, V[+1])), the state
    `initial_state` (None: zeros) advanced by the token.
    """
    check_retention_inputs(q_BH1K, k_BH1K, v_BH1V, decay_H, initial_state, offset, normalize_scores)
    B, H, L, K = q_BH1K.shape
    if L != 1:
        raise ValueError(f"retention_step decodes one token; got L={L} (use retention())")
    V = v_BH1V.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q = (q_BH1K.float() * scale)[:, :, 0]
    k = k_BH1K.float()[:, :, 0]
    v = v_BH1V.float()[:, :, 0]
    gamma = decay_H.float().view(1, H, 1)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state[..., :V].float()
    z = q.new_zeros(B, H, K)
    if initial_state is not None and normalize_scores:
        z = initial_state[..., V].float()
    # the row sum of D at this position: c = gamma c_prev + 1, c_prev = sum_{j<offset} gamma^j
    c = q.new_zeros(1, H, 1)
    if offset > 0:
        pos = torch.tensor([offset - 1], device=decay_H.device)
        c = decay_row_sums(torch.log(decay_H.float()), pos).view(1, H, 1)
    S = gamma[..., None] * S + k[..., None] * v[..., None, :]
    num = torch.einsum("bhk,bhkv->bhv", q, S)
    c = gamma * c + 1.0
    if normalize_decay:
        num = num / c.sqrt()
    if normalize_scores:
        z = gamma * z + k
        den = (q * z).sum(-1, keepdim=True)
        if normalize_decay:
            den = den / c.sqrt()
        num = num / den.detach().abs().clamp(min=1.0)
    state = torch.cat([S, z[..., None]], dim=-1) if normalize_scores else S
    return num.unsqueeze(2).to(v_BH1V.dtype), state
