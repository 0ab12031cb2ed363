"""Chunkwise RetNet retention in PyTorch: the CPU training path and the Triton kernel's twin.

Legend: B batch, H heads, L tokens, N chunks, C chunk size, K key dim, V value dim.
Per chunk i (RetNet paper, chunkwise form):
    R_i     = gamma^C R_{i-1} + K_[i]^T (V_[i] * zeta),   zeta_j = gamma^(C-1-j)
    O_[i]   = (Q_[i] K_[i]^T * D) V_[i] + (Q_[i] R_{i-1}) * xi,   xi_j = gamma^(j+1)
L need not be a multiple of C: the last chunk is zero-padded for the matmuls and the final
state is rebuilt from its true length (padding would otherwise decay it by gamma^pad).
Normalisations (documented in ``reference.py``) are applied by ``apply_normalizers`` around
an unnormalised core, shared with the Triton path: the row sum q_n.z_n of the scores is the
retention of an extra all-ones value column, so it rides along in the same kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .common import check_retention_inputs, decay_row_sums

# core(q, k, v, log_decay_H, scale, initial_state) -> (o, final_state fp32), no normalisation
RetentionCore = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor],
]


def apply_normalizers(
    core: RetentionCore,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_H: torch.Tensor,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    offset: int,
    normalize_decay: bool,
    normalize_scores: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an unnormalised retention core and apply RetNet's normalisations exactly."""
    check_retention_inputs(q, k, v, decay_H, initial_state, offset, normalize_scores)
    L, K = q.shape[2], q.shape[3]
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    log_decay = torch.log(decay_H.detach().float())
    v_in = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize_scores else v
    o, state = core(q, k, v_in, log_decay, scale, initial_state)
    if not (normalize_decay or normalize_scores):
        return o, state
    o = o.float()
    if normalize_decay:
        pos = torch.arange(offset, offset + L, device=q.device)
        o = o * decay_row_sums(log_decay, pos).rsqrt()[..., None]
    if normalize_scores:
        o = o[..., :V] / o[..., V:].detach().abs().clamp(min=1.0)
    return o.to(v.dtype), state


def _chunk_core(
    q_BHLK: torch.Tensor,
    k_BHLK: torch.Tensor,
    v_BHLV: torch.Tensor,
    log_decay_H: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, L, K = q_BHLK.shape
    V = v_BHLV.shape[-1]
    C = chunk_size
    N = max(1, math.ceil(L / C))
    pad = N * C - L
    pad_fn = lambda t: torch.nn.functional.pad(t.float(), (0, 0, 0, pad))
    q = (pad_fn(q_BHLK) * scale).view(B, H, N, C, K)
    k = pad_fn(k_BHLK).view(B, H, N, C, K)
    v = pad_fn(v_BHLV).view(B, H, N, C, V)

    g = log_decay_H.float().to(q.device)
    i = torch.arange(C, device=q.device).float()
    diff_CC = i[:, None] - i[None, :]
    D_HCC = torch.exp(torch.where(diff_CC >= 0, diff_CC * g.view(H, 1, 1), float("-inf")))
    xi_HC = torch.exp((i + 1) * g.view(H, 1))
    zeta_HC = torch.exp((C - 1 - i) * g.view(H, 1))
    chunk_decay = torch.exp(C * g).view(1, H, 1, 1)

    intra = ((q @ k.transpose(-1, -2)) * D_HCC[:, None]) @ v
    kv_BHNKV = (k * zeta_HC[:, None, :, None]).transpose(-1, -2) @ v
    R = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    before = []
    for n in range(N):
        before.append(R)
        R = chunk_decay * R + kv_BHNKV[:, :, n]
    R_before = torch.stack(before, dim=2)
    inter = (q @ R_before) * xi_HC[:, None, :, None]
    o = (intra + inter).reshape(B, H, N * C, V)[:, :, :L]

    if pad:
        # the last chunk holds r = C - pad real tokens
        r = C - pad
        k_last, v_last = k[:, :, -1, :r], v[:, :, -1, :r]
        zeta_r = torch.exp((r - 1 - i[:r]) * g.view(H, 1))
        R = torch.exp(r * g).view(1, H, 1, 1) * R_before[:, :, -1]
        R = R + (k_last * zeta_r[:, :, None]).transpose(-1, -2) @ v_last
    return o.to(v_BHLV.dtype), R


def retention_chunked(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise retention (any L, any chunk size); returns (o (B, H, L, V), final state fp32)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")

    def core(q, k, v, log_decay, sc, h0):
        return _chunk_core(q, k, v, log_decay, sc, h0, chunk_size)

    return apply_normalizers(
        core,
        q_BHLK,
        k_BHLK,
        v_BHLV,
        decay_H,
        scale=scale,
        initial_state=initial_state,
        offset=offset,
        normalize_decay=normalize_decay,
        normalize_scores=normalize_scores,
    )
