"""Parallel RetNet retention, (Q K^T * D) V with an explicit (L, L) decay mask, in fp32.

Legend: B batch, H heads, L tokens, K key dim, V value dim. O(L^2) memory: the training form of
the paper for short sequences and the second oracle for the chunkwise and Triton forms. The
normalisation options and the state layout are those documented in ``reference.py``.
"""

from __future__ import annotations

import torch

from .common import check_retention_inputs, decay_row_sums


def retention_parallel(
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
    """Retention as one masked matmul; returns (o (B, H, L, V), final state fp32)."""
    check_retention_inputs(q_BHLK, k_BHLK, v_BHLV, decay_H, initial_state, offset, normalize_scores)
    B, H, L, K = q_BHLK.shape
    V = v_BHLV.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q = q_BHLK.float() * scale
    k = k_BHLK.float()
    v = v_BHLV.float()
    log_g = torch.log(decay_H.float()).view(H, 1, 1)
    pos = torch.arange(L, device=q.device)
    diff_LL = (pos[:, None] - pos[None, :]).float()
    # exp(-inf) = 0 above the diagonal without ever forming gamma^(negative)
    D_HLL = torch.exp(torch.where(diff_LL >= 0, diff_LL * log_g, float("-inf")))

    A_BHLL = (q @ k.transpose(-1, -2)) * D_HLL
    num = A_BHLL @ v
    row_sum = A_BHLL.sum(-1)
    q_decay_HL = torch.exp((pos + 1).float() * log_g.view(H, 1))
    if initial_state is not None:
        S0 = initial_state[..., :V].float()
        num = num + (q @ S0) * q_decay_HL[..., None]
        if normalize_scores:
            z0 = initial_state[..., V].float()
            row_sum = row_sum + (q * z0[:, :, None, :]).sum(-1) * q_decay_HL
    if normalize_decay:
        inv_sqrt_c = decay_row_sums(log_g.view(H), pos + offset).rsqrt()
        num = num * inv_sqrt_c[..., None]
        row_sum = row_sum * inv_sqrt_c
    if normalize_scores:
        num = num / row_sum.detach().abs().clamp(min=1.0)[..., None]

    # final state: S_L = gamma^L S_0 + sum_m gamma^(L-1-m) k_m^T v_m (z likewise with v = 1)
    k_decay_HL = torch.exp((L - 1 - pos).float() * log_g.view(H, 1))
    kw = k * k_decay_HL[..., None]
    S = kw.transpose(-1, -2) @ v
    z = kw.sum(2)
    if initial_state is not None:
        carry = torch.exp(L * log_g.view(1, H, 1, 1))
        S = S + carry * initial_state[..., :V].float()
        if normalize_scores:
            z = z + carry[..., 0] * initial_state[..., V].float()
    state = torch.cat([S, z[..., None]], dim=-1) if normalize_scores else S
    return num.to(v_BHLV.dtype), state
