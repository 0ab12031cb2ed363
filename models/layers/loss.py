"""Next-token cross-entropy without materialising (B, L, vocab) logits.

At 2M tokens a 32K-vocab logit tensor is 128 GiB in bf16; computing it in chunks of positions,
each recomputed in backward (activation checkpointing), keeps only (B, chunk, vocab) alive.
The final norm can run inside the chunks too (`norm`), so its full-length activations are not
kept either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _ce_sum(
    h_BTD: Tensor,
    weight_VD: Tensor,
    targets_BT: Tensor,
    mask_BT: Tensor,
    norm: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    if norm is not None:
        h_BTD = norm(h_BTD)
    logits = (h_BTD @ weight_VD.t()).float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), reduction="none")
    return (ce * mask_BT.flatten()).sum()


def chunked_lm_loss(
    hidden_BLD: Tensor,
    weight_VD: Tensor,
    targets_BL: Tensor,
    loss_mask_BL: Tensor | None = None,
    chunk: int = 16384,
    norm: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Mean cross-entropy of `norm(hidden) @ weight.T` against `targets` over masked positions.

    `norm` must act on each position alone (RMSNorm): it is applied chunk by chunk.
    """
    mask = (
        loss_mask_BL.float()
        if loss_mask_BL is not None
        else torch.ones_like(targets_BL, dtype=torch.float32)
    )
    total = hidden_BLD.new_zeros((), dtype=torch.float32)
    # split, not slices: one backward node that concatenates the chunk gradients, where each
    # slice would back-propagate a full-length zero tensor (O(L^2 / chunk) work).
    pieces = zip(hidden_BLD.split(chunk, 1), targets_BL.split(chunk, 1), mask.split(chunk, 1))
    for h, t, m in pieces:
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, h, weight_VD, t, m, norm, use_reentrant=False)
        else:
            total = total + _ce_sum(h, weight_VD, t, m, norm)
    return total / mask.sum().clamp_min(1.0)
