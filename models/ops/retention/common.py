"""RetNet retention, the pieces every form shares: the decay schedule, the input contract's
checks and the decay-mask row sums (conventions: ``reference.py``'s docstring). Why a module of
its own: the fast forms (chunked, parallel, triton, the decoding step) and the models import
these, never the oracle ``reference.py``, so its recurrence stays independent of them.
"""

from __future__ import annotations

import torch


def retnet_decay(
    num_heads: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """RetNet's multi-scale decay gamma_h = 1 - 2^(-5-h), shape (H,)."""
    h = torch.arange(num_heads, device=device, dtype=torch.float64)
    return (1.0 - torch.pow(2.0, -5.0 - h)).to(dtype)


def check_retention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None,
    offset: int,
    normalize_scores: bool,
) -> None:
    """Raise ValueError naming the argument whose shape breaks the (B, H, L, D) contract."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q, k must both be (B, H, L, K); got {tuple(q.shape)}, {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be (B, H, L, V) matching q {tuple(q.shape)}; got {tuple(v.shape)}"
        )
    num_heads = q.shape[1]
    if decay.shape != (num_heads,):
        raise ValueError(f"decay must have shape ({num_heads},); got {tuple(decay.shape)}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0; got {offset}")
    if initial_state is not None:
        B, H, _, K = q.shape
        V = v.shape[-1] + (1 if normalize_scores else 0)
        if initial_state.shape != (B, H, K, V):
            raise ValueError(
                f"initial_state must be {(B, H, K, V)} (V + 1 columns when normalize_scores); "
                f"got {tuple(initial_state.shape)}"
            )


def decay_row_sums(log_decay_H: torch.Tensor, positions_L: torch.Tensor) -> torch.Tensor:
    """c_p = sum_{j<=p} gamma^j = (1 - gamma^(p+1)) / (1 - gamma), shape (H, L), fp32."""
    g = log_decay_H.double()[:, None]
    p1 = positions_L.double()[None, :] + 1.0
    geometric = torch.expm1(p1 * g) / torch.expm1(g).where(g != 0, torch.ones_like(g))
    return torch.where(g == 0, p1.expand_as(geometric), geometric).float()
