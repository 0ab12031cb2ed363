"""Next-token cross-entropy without materialising (B, L, vocab) logits.

At 2M tokens a 32K-vocab logit tensor is 128 GiB in bf16; computing it in chunks of positions,
each recomputed in backward (activation checkpointing), keeps only (B, chunk, vocab) alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _ce_sum(h_BTD: Tensor, weight_VD: Tensor, targets_BT: Tensor, mask_BT: Tensor) -> Tensor:
    logits = (h_BTD @ weight_VD.t()).float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), reduction="none")
    return (ce * mask_BT.flatten()).sum()


def chunked_lm_loss(
    hidden_BLD: Tensor,
    weight_VD: Tensor,
    targets_BL: Tensor,
    loss_mask_BL: Tensor | None = None,
    chunk: int = 16384,
) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` over masked positions."""
    mask = (
        loss_mask_BL.float()
        if loss_mask_BL is not None
        else torch.ones_like(targets_BL, dtype=torch.float32)
    )
    total = hidden_BLD.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden_BLD.shape[1], chunk):
        args = (
            hidden_BLD[:, s : s + chunk],
            weight_VD,
            targets_BL[:, s : s + chunk],
            mask[:, s : s + chunk],
        )
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, *args, use_reentrant=False)
        else:
            total = total + _ce_sum(*args)
    return total / mask.sum().clamp_min(1.0)
