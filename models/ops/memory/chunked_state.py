"""Neural-memory op, chunked form: how it lays out its inputs and states.

Inputs are cut into chunks, (n, G, T, ...) with G = B H (`_to_chunks`). Each layer's state is
one tensor holding the accumulator X and the momentum S stacked, [X; S] (G, m d_in, d_out) with
m = 2 state blocks (m = 1 without momentum), or [Xᵀ; Sᵀ] when `_transposed` says the layer is
stored transposed; the helpers below split it (`_blocks`), carry it across a chunk (`_mix`) and
build the operands of its outer-product update (`_update_operands`, `_scale_rows`). The
algorithm (chunked.py) and its autograd nodes (chunked_autograd.py) both use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.ops.memory.common import MemoryRule


def _to_chunks(x: Tensor, num: int, size: int, pad_value: float) -> Tensor:
    """(G, L, ...) -> (n, G, T, ...) contiguous, padding the last chunk with pad_value."""
    pad = num * size - x.shape[1]
    if pad:
        widths = [0, 0] * (x.dim() - 2) + [0, pad]
        x = F.pad(x, widths, value=pad_value)
    x = x.reshape(x.shape[0], num, size, *x.shape[2:])
    return x.movedim(1, 0).contiguous()


def _blocks(st: Tensor, m: int, tr: bool) -> tuple[Tensor, Tensor | None]:
    """A layer's state -> its X block and S block (None without momentum), each
    (…, d_in, d_out): the state is [X; S] (…, m d_in, d_out), or [Xᵀ; Sᵀ] when `tr`."""
    rows = st.shape[-2] // m
    x, s = st[..., :rows, :], (st[..., rows:, :] if m == 2 else None)
    if tr:
        return x.mT, (None if s is None else s.mT)
    return x, s


def _transposed(weights: tuple[Tensor, ...] | list[Tensor], m: int, rule: MemoryRule) -> list[bool]:
    """Per layer, whether its state is stored transposed, [Xᵀ; Sᵀ].

    Stacking [X; S] makes every op that weighs the two blocks per token (the write's z_i, the
    read's a_t) scale a d_in-wide operand once per block; stored as [Xᵀ; Sᵀ] the d_out-wide one
    is scaled instead (δ_i in the write, the (T, m d_out) product in the read). So the narrower
    side is scaled: 4x less elementwise work in the second layer of an expansion-4 MLP.
    """
    if m == 1 or rule.retention == "kl":
        return [False] * len(weights)
    return [w.shape[-2] > w.shape[-1] for w in weights]


def _scale_rows(w: Tensor, z: Tensor) -> Tensor:
    """(…, T, m, 1) weights ⊙ z (…, T, d) -> (…, T, m d): z scaled once per state block."""
    if w.shape[-2] == 1:
        return w[..., 0, :] * z
    return (w * z.unsqueeze(-2)).flatten(-2)


def _mix(mix: Tensor, st: Tensor, m: int) -> Tensor:
    """The chunk-start state carried to the chunk's end: mix @ [X; S] (m = 1: β_end X)."""
    if m == 1:
        return mix * st
    return torch.bmm(mix, st.unflatten(-2, (m, -1)).flatten(-2)).view_as(st)


def _update_operands(wh: Tensor, z: Tensor, delta: Tensor, tr: bool) -> tuple[Tensor, Tensor]:
    """(Uᵀ, V) with the chunk's state update Uᵀ V = Σ_i [wh_i ⊙ z_i] δ_iᵀ (transposed: δ z)."""
    if tr:
        return _scale_rows(wh, delta).mT, z
    return _scale_rows(wh, z).mT, delta
