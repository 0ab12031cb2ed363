"""Neural-memory op, chunked form: its custom autograd nodes, forward and backward by hand.

The algorithm (chunked.py) builds each chunk's write and the batched read from these:
  _GeluPair     (gelu(x), gelu'(x)) from one pass, differentiable again (the outer training
                step differentiates the inner MLP backward);
  _GroupMatmul  a group of chunks times each chunk's own states / zs / deltas, without the
                copies stacking them would make, with a gelu or a mask folded in and redone;
  _WriteL2      one chunk's write for the l2 bias and l2 retention (Titans) as one node.
Each keeps only what it cannot cheaply redo. tests/unit/test_memory_op.py checks them against
finite differences (`_WriteL2`) and, through the op, against the reference's autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.ops.memory.chunked_state import _blocks, _mix, _scale_rows, _update_operands

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


class _GeluPair(torch.autograd.Function):
    """(gelu(x), gelu'(x)) from one pass: Φ and φ computed once, not in three ops.

    gelu' = Φ + x φ multiplies the backpropagated error of the inner MLP backward, and the
    outer training step differentiates it again: d gelu' / dx = φ (2 - x²) (exact). Backward
    recomputes φ from x (one exp) rather than saving it; gelu' is saved anyway by the product
    that consumes it. Written with in-place ops: per-op overhead dominates at chunk widths.
    """

    @staticmethod
    def _pdf(x: Tensor) -> Tensor:
        return x.square().mul_(-0.5).exp_().mul_(_INV_SQRT_2PI)

    @staticmethod
    def _cdf(x: Tensor) -> Tensor:
        return torch.erf(x * _INV_SQRT_2).add_(1.0).mul_(0.5)

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        cdf = _GeluPair._cdf(x)
        gelu = x * cdf
        return gelu, cdf.addcmul_(x, _GeluPair._pdf(x))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, g_gelu: Tensor | None, g_slope: Tensor | None) -> Tensor:  # noqa: ANN001
        x, slope = ctx.saved_tensors
        out = torch.zeros_like(x) if g_gelu is None else g_gelu * slope
        if g_slope is not None:
            curv = _GeluPair._pdf(x).mul_(x.square().neg_().add_(2.0))  # φ (2 - x²)
            out.addcmul_(curv, g_slope)
        return out


class _GroupMatmul(torch.autograd.Function):
    """Row block c of a (r G, M, K) times bs[c] (G, K, N) (times bs[c]ᵀ with tr), c < r.

    The batched read multiplies a group's chunks by their own states, zs and deltas. Stacking
    those pieces into one tensor for a single bmm copies them (~8 MB per group and layer here,
    again in backward), and a plain bmm would save the copy: the pieces twice in memory, since
    the writes' backward keeps them too. One bmm per chunk into slices of one output copies
    nothing and is no slower at these sizes (measured: 3.9 vs 4.7 ms for a group of 16).

    What it keeps is the left operand as given, so two cheap maps in front of it are folded in
    and redone in backward rather than kept: `gelu` (the left operand is gelu(a), a the hidden
    pre-activation, which the read keeps anyway) and `mask` (the left operand is a ⊙ mask, the
    decay-weighted scores (a Zᵀ) ⊙ C with C kept for every layer). Several right operands per
    chunk (bs = r chunks x k sets) give k outputs from one left operand.
    """

    @staticmethod
    def _left(a: Tensor, gelu: bool, mask: Tensor | None) -> Tensor:
        if gelu:
            if mask is not None:
                raise ValueError("_GroupMatmul folds in a gelu or a mask, not both")
            return a * _GeluPair._cdf(a)
        return a if mask is None else a * mask

    @staticmethod
    def forward(a: Tensor, tr: bool, gelu: bool, mask: Tensor | None, *bs: Tensor):  # noqa: ANN205
        g = bs[0].shape[0]
        r = a.shape[0] // g
        left = _GroupMatmul._left(a, gelu, mask)
        outs = []
        for j in range(0, len(bs), r):
            out = a.new_empty(a.shape[0], a.shape[1], bs[j].shape[-2 if tr else -1])
            for c, b in enumerate(bs[j : j + r]):
                rows = slice(c * g, (c + 1) * g)
                torch.bmm(left[rows], b.mT if tr else b, out=out[rows])
            outs.append(out)
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        a, ctx.tr, ctx.gelu, mask, *bs = inputs
        ctx.has_mask = mask is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a, *([mask] if ctx.has_mask else []), *bs)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        a, *bs = ctx.saved_tensors
        mask = bs.pop(0) if ctx.has_mask else None
        g, tr = bs[0].shape[0], ctx.tr
        r = a.shape[0] // g
        rows = [slice(c * g, (c + 1) * g) for c in range(r)]
        sets = [bs[j : j + r] for j in range(0, len(bs), r)]
        cdf = _GeluPair._cdf(a) if ctx.gelu else None  # Φ(a): gelu = a Φ, gelu' = Φ + a φ
        left = a * cdf if ctx.gelu else _GroupMatmul._left(a, False, mask)  # bitwise the forward's
        g_left = None
        if ctx.needs_input_grad[0] or (mask is not None and ctx.needs_input_grad[3]):
            for grad, b_set in zip(grads, sets):
                if grad is None:
                    continue
                if g_left is None:
                    g_left = torch.empty_like(a)
                    for row, b in zip(rows, b_set):
                        torch.bmm(grad[row], b if tr else b.mT, out=g_left[row])
                else:
                    for row, b in zip(rows, b_set):  # out=, not baddbmm_: FLOP counters see it
                        acc = g_left[row]
                        torch.baddbmm(acc, grad[row], b if tr else b.mT, out=acc)
        gbs: list[Tensor | None] = []
        for grad in grads:
            if grad is None or not any(ctx.needs_input_grad[4:]):
                gbs += [None] * r
            elif tr:
                gbs += [torch.bmm(grad[row].mT, left[row]) for row in rows]
            else:
                gbs += [torch.bmm(left[row].mT, grad[row]) for row in rows]
        g_a = g_mask = None
        if g_left is not None:
            if cdf is not None:
                g_a = g_left.mul_(cdf.addcmul_(a, _GeluPair._pdf(a)))
            elif mask is None:
                g_a = g_left
            else:
                g_mask = g_left * a if ctx.needs_input_grad[3] else None
                g_a = g_left.mul_(mask) if ctx.needs_input_grad[0] else None
        return (g_a, None, None, g_mask, *gbs)


def _gelu_derivs(p: Tensor) -> tuple[Tensor, Tensor]:
    """gelu'(p) = Φ(p) + p φ(p) and gelu''(p) = φ(p) (2 - p²), recomputed in backward (two
    elementwise passes) instead of saved."""
    sq = p.square()
    pdf = sq.mul(-0.5).exp_().mul_(_INV_SQRT_2PI)
    slope = _GeluPair._cdf(p).addcmul_(p, pdf)
    return slope, sq.neg_().add_(2.0).mul_(pdf)


def _add(acc: Tensor | None, x: Tensor | None, frozen: set[int]) -> Tensor | None:
    """acc + x where either may be None (a zero gradient). Adds into acc's memory unless acc is
    in `frozen` (the ids of the gradients autograd handed in: those are not ours to modify)."""
    if x is None:
        return acc
    if acc is None:
        return x
    if id(acc) not in frozen:
        return acc.add_(x)
    if id(x) not in frozen and x.shape == acc.shape:
        return x.add_(acc)
    return acc + x


class _WriteL2(torch.autograd.Function):
    """One chunk's write for the l2 bias and l2 retention (Titans), forward and backward by hand.

    The same function as the autograd path of `_write` (which the other Miras choices take), but
    its backward keeps only what it cannot cheaply redo: the chunk-start states, the keys, the
    gates and the outputs the read keeps anyway (zs, deltas). Each hidden layer's pre-activation
    p and back-propagated error e (before the slope) are one bmm each from those, so backward
    recomputes them (2 x (G, T, hidden) floats a chunk). Autograd would also keep gelu'(p) and the
    gate-scaled copies of zs / deltas the state update multiplies (~0.5 MB per chunk here, a
    fifth of the op's memory) and walk ~40 nodes per chunk; this is one node.

    Inputs: trs, m as in `_write`; k (G, T, d_0); rv (G, T, d_L); mix (G, m, m); wh (G, T, m, 1);
    the states. Outputs: the hidden zs (zs[1:]), the deltas, the new states.
    """

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        trs: tuple[bool, ...],
        m: int,
        k: Tensor,
        rv: Tensor,
        mix: Tensor,
        wh: Tensor,
        *sts: Tensor,
    ) -> tuple[Tensor, ...]:
        depth = len(sts)
        ws = [_blocks(st, m, tr)[0] for st, tr in zip(sts, trs)]
        zs, ps, slopes, h = [k], [], [], k
        for i in range(depth - 1):
            p = torch.bmm(h, ws[i])
            h, slope = _GeluPair.forward(p)
            ps.append(p)
            slopes.append(slope)
            zs.append(h)
        deltas: list[Tensor] = [torch.baddbmm(rv, h, ws[-1])] * depth
        es: list[Tensor] = [None] * (depth - 1)  # type: ignore[list-item]
        for i in range(depth - 1, 0, -1):
            es[i - 1] = torch.bmm(deltas[i], ws[i].mT)
            deltas[i - 1] = es[i - 1] * slopes[i - 1]
        new = [
            torch.baddbmm(_mix(mix, st, m), *_update_operands(wh, zs[i], deltas[i], tr), alpha=-1.0)
            for i, (st, tr) in enumerate(zip(sts, trs))
        ]
        ctx.trs, ctx.m, ctx.depth = trs, m, depth
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(k, mix, wh, *sts, *zs[1:], *deltas)
        return (*zs[1:], *deltas, *new)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        trs, m, depth = ctx.trs, ctx.m, ctx.depth
        frozen = {id(g) for g in grads if g is not None}
        k, mix, wh, *rest = ctx.saved_tensors
        sts = rest[:depth]
        zs = [k, *rest[depth : 2 * depth - 1]]
        deltas = rest[2 * depth - 1 :]
        g_z: list[Tensor | None] = [None, *grads[: depth - 1]]
        g_d: list[Tensor | None] = list(grads[depth - 1 : 2 * depth - 1])
        g_new = grads[2 * depth - 1 :]
        ws = [_blocks(st, m, tr)[0] for st, tr in zip(sts, trs)]
        # recomputed, not saved: one bmm each per hidden layer (~4% of the step's matmuls)
        # against 2 x (G, T, hidden) floats a chunk (~11% of the op's memory here)
        ps = [torch.bmm(zs[i], ws[i]) for i in range(depth - 1)]
        es = [torch.bmm(deltas[i], ws[i].mT) for i in range(1, depth)]
        g_w: list[Tensor | None] = [None] * depth
        g_sts: list[Tensor | None] = [None] * depth
        g_mix = g_wh = None
        # new = mix ∘ st - Uᵀ V, U = wh ⊙ A (A = z, V = δ; transposed layers: A = δ, V = z)
        for i, (st, tr, g) in enumerate(zip(sts, trs, g_new)):
            if g is None:
                continue
            a_op, v_op = (deltas[i], zs[i]) if tr else (zs[i], deltas[i])
            g_u = torch.bmm(v_op, g.mT).neg_().unflatten(-1, (m, -1))  # (G, T, m, d_a)
            g_v = torch.bmm(_scale_rows(wh, a_op), g).neg_()
            g_a = (g_u * wh).sum(-2)
            g_wh = _add(g_wh, (g_u * a_op.unsqueeze(-2)).sum(-1, keepdim=True), frozen)
            if tr:
                g_d[i], g_z[i] = _add(g_d[i], g_a, frozen), _add(g_z[i], g_v, frozen)
            else:
                g_z[i], g_d[i] = _add(g_z[i], g_a, frozen), _add(g_d[i], g_v, frozen)
            # carry: new = mix @ [X; S] per (G, m, d_in d_out) view
            g_sts[i] = _mix(mix.mT, g, m)
            g_rows, st_rows = (t.unflatten(-2, (m, -1)).flatten(-2) for t in (g, st))
            g_mix = _add(g_mix, torch.bmm(g_rows, st_rows.mT), frozen)
        # deltas[i-1] = e_i ⊙ gelu'(p_{i-1}), e_i = deltas[i] W_iᵀ (forward ran i = L-1 .. 1)
        g_s: list[Tensor | None] = [None] * (depth - 1)
        derivs = [_gelu_derivs(p) for p in ps]  # (slope, curvature) per hidden layer
        for i in range(1, depth):
            gd = g_d[i - 1]
            if gd is None:
                continue
            g_e = gd * derivs[i - 1][0]
            g_s[i - 1] = gd * es[i - 1]
            g_d[i] = _add(g_d[i], torch.bmm(g_e, ws[i]), frozen)
            g_w[i] = _add(g_w[i], torch.bmm(g_e.mT, deltas[i]), frozen)
        # deltas[L-1] = r = rv + z_{L-1} W_{L-1}
        g_r = g_d[depth - 1]
        if g_r is not None:
            g_z[depth - 1] = _add(g_z[depth - 1], torch.bmm(g_r, ws[-1].mT), frozen)
            g_w[-1] = _add(g_w[-1], torch.bmm(zs[-1].mT, g_r), frozen)
        # z_{i+1} = gelu(p_i), p_i = z_i W_i
        for i in range(depth - 2, -1, -1):
            slope, curv = derivs[i]
            g_p = None if g_z[i + 1] is None else g_z[i + 1] * slope
            if g_s[i] is not None:
                g_p = _add(g_p, curv.mul_(g_s[i]), frozen)
            if g_p is None:
                continue
            g_z[i] = _add(g_z[i], torch.bmm(g_p, ws[i].mT), frozen)
            g_w[i] = _add(g_w[i], torch.bmm(zs[i].mT, g_p), frozen)
        for i, (st, tr) in enumerate(zip(sts, trs)):
            if g_w[i] is None:
                continue
            if g_sts[i] is None:
                g_sts[i] = torch.zeros_like(st)
            _blocks(g_sts[i], m, tr)[0].add_(g_w[i])
        return (None, None, g_z[0], g_r, g_mix, g_wh, *g_sts)
