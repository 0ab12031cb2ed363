"""A scan over segments whose backward recomputes one segment at a time.

    y, s_n = checkpointed_scan(step, x_BLC, s_0, params, seg)

runs y_j, s_{j+1} = step(x_j, s_j) over the segments x_j = x[:, j seg : (j + 1) seg] and
returns the y_j concatenated along L and the last state. Forward builds no autograd graph: it
keeps x and the (small) state at every segment boundary. Backward walks the segments last to
first, recomputing each with grad and back-propagating it alone, so at most one segment's graph
is alive.

Why not `torch.utils.checkpoint` per segment. Its non-reentrant form builds the whole graph in
forward and keeps it until backward (only the saved tensors are dropped): every saved tensor
becomes a Python holder, a weakref and a metadata dict, ~1 KB each with its node; the Titans MAC
block saves ~7 per token, which made ~9 KB/token of bookkeeping, twice over when a block-level
checkpoint recomputed the block in backward. Its per-segment `x[:, s:e]` slices also
back-propagate one full-length zero gradient each (O(L^2 / seg) work).

`step` must be deterministic (no dropout: the RNG state is not replayed) and must read the
parameters it uses from its module, the same tensors as `params` (FSDP2 keeps the unsharded
parameter objects between forward and backward). Its state is a list of tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Step = Callable[[Tensor, list[Tensor]], tuple[Tensor, list[Tensor]]]


def autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    """The autocast modes in force now (this device type and CPU), for `replay_autocast`."""
    kinds = {device_type, "cpu"}
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in kinds]


class _CheckpointedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: Step, seg: int, num_state: int, x: Tensor, *rest: Tensor):  # noqa: ANN001
        state, params = list(rest[:num_state]), rest[num_state:]
        length = x.shape[1]
        boundaries, y = [], None
        for s in range(0, length, seg):
            boundaries.append(state)
            y_j, state = step(x[:, s : s + seg], state)
            if y is None:
                y = y_j.new_empty(x.shape[0], length, *y_j.shape[2:])
            y[:, s : s + seg] = y_j
        # Kept on ctx, not save_for_backward: an enclosing activation checkpoint would drop
        # them through its saved-tensor hooks and rerun the whole scan in backward to get them.
        ctx.step, ctx.seg, ctx.params = step, seg, params
        ctx.x, ctx.x_version, ctx.boundaries = x, x._version, boundaries
        ctx.autocast = autocast_state(x.device.type)
        return (y, *state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor, *grad_state: Tensor):  # noqa: ANN001
        x, seg, boundaries = ctx.x, ctx.seg, ctx.boundaries
        if x._version != ctx.x_version:
            raise RuntimeError("checkpointed_scan: its input was modified in place after forward")
        all_params = ctx.params
        params = [p for p in all_params if p.requires_grad]
        grad_x = torch.empty_like(x) if x.requires_grad else None
        grad_params: list[Tensor | None] = [None] * len(params)
        grads = list(grad_state)
        with torch.enable_grad():
            for j in range(len(boundaries) - 1, -1, -1):
                s = j * seg
                x_j = x[:, s : s + seg].detach().requires_grad_(x.requires_grad)
                s_j = [t.detach().requires_grad_(t.is_floating_point()) for t in boundaries[j]]
                boundaries[j] = None  # the state is recomputed, not kept any longer
                # Forward under the forward's autocast; backward outside it, as autograd would.
                with replay_autocast(ctx.autocast):
                    y_j, s_next = ctx.step(x_j, s_j)
                outs = [y_j, *s_next]
                douts = [grad_y[:, s : s + seg], *grads]
                # A state the later segments never read gets no gradient (None): skip it.
                keep = [i for i, o in enumerate(outs) if o.requires_grad and douts[i] is not None]
                wrt = [t for t in (x_j, *s_j) if t.requires_grad] + params
                got = [None] * len(wrt)
                if keep:
                    got = list(
                        torch.autograd.grad(
                            [outs[i] for i in keep],
                            wrt,
                            [douts[i] for i in keep],
                            allow_unused=True,
                        )
                    )
                if grad_x is not None:
                    g = got.pop(0)
                    grad_x[:, s : s + seg] = 0.0 if g is None else g
                grads = [got.pop(0) if t.requires_grad else None for t in s_j]
                for i, g in enumerate(got):
                    if g is not None:
                        grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        ctx.x = ctx.boundaries = ctx.params = None  # free the input before lower layers run
        by_param = iter(grad_params)
        grad_rest = [next(by_param) if p.requires_grad else None for p in all_params]
        return (None, None, None, grad_x, *grads, *grad_rest)


class replay_autocast:  # noqa: N801 - used as a context manager, like torch.autocast
    """Re-enter the forward's autocast state (backward may run on another thread)."""

    def __init__(self, state: list[tuple[str, bool, torch.dtype]]) -> None:
        self.modes = [torch.autocast(d, dtype=dt, enabled=on) for d, on, dt in state]

    def __enter__(self) -> None:
        for m in self.modes:
            m.__enter__()

    def __exit__(self, *exc: object) -> None:
        for m in reversed(self.modes):
            m.__exit__(*exc)


def checkpointed_scan(
    step: Step, x_BLC: Tensor, state: Sequence[Tensor], params: Sequence[Tensor], seg: int
) -> tuple[Tensor, list[Tensor]]:
    """(cat_j y_j, s_n) of `step` over segments of `seg` positions (module docstring).

    `params`: every parameter `step` reads from its module (their gradients are returned to
    them); `state`: the tensors of s_0. Without grad mode the scan simply runs.
    """
    if seg < 1:
        raise ValueError(f"seg must be >= 1, got {seg}")
    if not torch.is_grad_enabled():
        ys, state = [], list(state)
        for s in range(0, x_BLC.shape[1], seg):
            y_j, state = step(x_BLC[:, s : s + seg], state)
            ys.append(y_j)
        return torch.cat(ys, dim=1), state
    y, *last = _CheckpointedScan.apply(step, seg, len(state), x_BLC, *state, *params)
    return y, last
