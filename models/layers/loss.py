"""Next-token cross-entropy without materialising (B, L, vocab) logits.

At 2M tokens a 32K-vocab logit tensor is 128 GiB in bf16; computing it in chunks of positions,
each recomputed in backward (activation checkpointing), keeps only (B, chunk, vocab) alive.
The final norm can run inside the chunks too (`norm`), so its full-length activations are not
kept either.

The recompute is our own autograd Function, not `torch.utils.checkpoint`: that one imports
torch._dynamo and with it triton (~150 MB of RSS in a CPU process, measured), and this loss
runs in every training step of the Titans / Miras models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.precision import compute_dtype, upcast
from models.layers.segment_scan import autocast_state, replay_autocast


def _ce_sum(
    h_BTD: Tensor,
    weight_VD: Tensor,
    targets_BT: Tensor,
    mask_BT: Tensor,
    norm: nn.Module | None,
) -> Tensor:
    if norm is not None:
        h_BTD = norm(h_BTD)
    logits = upcast(h_BTD @ weight_VD.t())
    ce = F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), reduction="none")
    return (ce * mask_BT.flatten()).sum()


def _ce_chunks(
    h: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, norm: nn.Module | None, chunk: int
) -> Tensor:
    """Σ of _ce_sum over chunks of `chunk` positions (only one chunk's logits alive)."""
    total = h.new_zeros((), dtype=compute_dtype(h.dtype))
    for s in range(0, h.shape[1], chunk):
        e = s + chunk
        total = total + _ce_sum(h[:, s:e], weight, targets[:, s:e], mask[:, s:e], norm)
    return total


class _ChunkedCE(torch.autograd.Function):
    """Σ_chunks _ce_sum: forward keeps only its inputs; backward recomputes one chunk at a time
    (under the forward's autocast) and back-propagates it alone."""

    @staticmethod
    def forward(ctx, norm, chunk, h, weight, targets, mask, *params):  # noqa: ANN001
        total = _ce_chunks(h, weight, targets, mask, norm, chunk)
        ctx.save_for_backward(h, weight, targets, mask)
        ctx.norm, ctx.chunk, ctx.params = norm, chunk, params
        ctx.autocast = autocast_state(h.device.type)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # noqa: ANN001
        h, weight, targets, mask = ctx.saved_tensors
        all_params = ctx.params
        params = [p for p in all_params if p.requires_grad]
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w: Tensor | None = None
        grad_p: list[Tensor | None] = [None] * len(params)
        with torch.enable_grad():
            for s in range(0, h.shape[1], ctx.chunk):
                e = s + ctx.chunk
                h_j = h[:, s:e].detach().requires_grad_(h.requires_grad)
                w = weight.detach().requires_grad_(weight.requires_grad)
                with replay_autocast(ctx.autocast):
                    out = _ce_sum(h_j, w, targets[:, s:e], mask[:, s:e], ctx.norm)
                leaves = [t for t in (h_j, w) if t.requires_grad] + params
                got = list(torch.autograd.grad(out, leaves, grad, allow_unused=True))
                if grad_h is not None:
                    g = got.pop(0)
                    grad_h[:, s:e] = 0.0 if g is None else g
                if weight.requires_grad:
                    g = got.pop(0)
                    grad_w = g if grad_w is None else grad_w + g
                for i, g in enumerate(got):
                    if g is not None:
                        grad_p[i] = g if grad_p[i] is None else grad_p[i] + g
        ctx.norm = ctx.params = None
        by_param = iter(grad_p)
        grad_rest = [next(by_param) if p.requires_grad else None for p in all_params]
        return (None, None, grad_h, grad_w, None, None, *grad_rest)


def chunked_lm_loss(
    hidden_BLD: Tensor,
    weight_VD: Tensor,
    targets_BL: Tensor,
    loss_mask_BL: Tensor | None = None,
    chunk: int = 16384,
    norm: nn.Module | None = None,
) -> Tensor:
    """Mean cross-entropy of `norm(hidden) @ weight.T` against `targets` over masked positions.

    `norm` must act on each position alone (RMSNorm): it is applied chunk by chunk; its
    parameters get their gradients (a module, so that the recompute can return them).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if norm is not None and not isinstance(norm, nn.Module):
        raise TypeError(
            f"norm must be an nn.Module (the recompute returns its parameters' gradients), "
            f"got {type(norm).__name__}"
        )
    mask = (
        loss_mask_BL.float()
        if loss_mask_BL is not None
        else torch.ones_like(targets_BL, dtype=torch.float32)
    )
    if torch.is_grad_enabled():
        params = list(norm.parameters()) if norm is not None else []
        total = _ChunkedCE.apply(norm, chunk, hidden_BLD, weight_VD, targets_BL, mask, *params)
    else:
        total = _ce_chunks(hidden_BLD, weight_VD, targets_BL, mask, norm, chunk)
    return total / mask.sum().clamp_min(1.0)
