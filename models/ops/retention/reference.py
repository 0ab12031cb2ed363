"""Recurrent RetNet retention in fp32, token by token: the oracle every fast form must match.

Legend: B batch, H heads, L tokens, K key dim, V value dim.

Conventions shared by all forms (parallel, chunked, triton):
- ``decay`` is gamma per head, shape (H,), in (0, 1]; it is a constant (RetNet fixes it), so the
  Triton path returns no gradient for it.
- ``scale`` multiplies q.k (default K**-0.5, RetNet's "k scaled by d^-1/2"); it is applied to q,
  so the carried state S = sum gamma^(n-m) k_m^T v_m is unscaled (as in fla).
- ``normalize_decay``: D_nm = gamma^(n-m) is divided by sqrt(c_p), c_p = sum_{j<=p} gamma^j the
  row sum of D at absolute position p = offset + n (torchscale's running "scale").
- ``normalize_scores``: the output row is divided by max(|sum_m A_nm|, 1), A the (normalised)
  scores including the tokens already folded into the initial state. That row sum is q_n.z_n
  with z_n = gamma z_{n-1} + k_n, so the state then carries z as an extra last value column:
  state shape (B, H, K, V + 1). The divisor is detached, as in torchscale (the GroupNorm that
  follows retention makes the output invariant to it).
- ``offset`` is the number of tokens already absorbed into ``initial_state``; only the decay
  normalisation depends on it.
"""

from __future__ import annotations

import torch

from .common import check_retention_inputs, decay_row_sums


def retention_recurrent(
    q_BHLK: torch.Tensor,
    k_BHLK: torch.Tensor,
    v_BHLV: torch.Tensor,
    decay_H: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    offset: int = 0,
    normalize_decay: bool = False,
    normalize_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n, one token at a time in fp32.

    Also the decoding form: call it with L = 1 and the previous state (and offset). Returns
    (o (B, H, L, V) in v's dtype, final state fp32 (B, H, K, V[+1])).
    """
    check_retention_inputs(q_BHLK, k_BHLK, v_BHLV, decay_H, initial_state, offset, normalize_scores)
    B, H, L, K = q_BHLK.shape
    V = v_BHLV.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q = q_BHLK.float() * scale
    k = k_BHLK.float()
    v = v_BHLV.float()
    gamma = decay_H.float().view(1, H, 1)
    S = q.new_zeros(B, H, K, V)
    z = q.new_zeros(B, H, K)
    if initial_state is not None:
        S = initial_state[..., :V].float()
        if normalize_scores:
            z = initial_state[..., V].float()
    # running row sum of D: c = gamma c + 1 per token, started at sum_{j<offset} gamma^j
    c = q.new_zeros(1, H, 1)
    if offset > 0:
        pos = torch.tensor([offset - 1], device=decay_H.device)
        c = decay_row_sums(torch.log(decay_H.float()), pos).view(1, H, 1)

    outs = []
    for n in range(L):
        S = gamma[..., None] * S + k[:, :, n, :, None] * v[:, :, n, None, :]
        num = torch.einsum("bhk,bhkv->bhv", q[:, :, n], S)
        c = gamma * c + 1.0
        if normalize_decay:
            num = num / c.sqrt()
        if normalize_scores:
            z = gamma * z + k[:, :, n]
            den = (q[:, :, n] * z).sum(-1, keepdim=True)
            if normalize_decay:
                den = den / c.sqrt()
            num = num / den.detach().abs().clamp(min=1.0)
        outs.append(num)
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, V)
    state = torch.cat([S, z[..., None]], dim=-1) if normalize_scores else S
    return o.to(v_BHLV.dtype), state
