"""The elementwise ends of a memory layer as single autograd nodes that keep only their inputs.

Legend: B batch, L length, C channels, H heads, D head width, K conv taps.

Why. Around the Titans / Miras memory op sit two chains of cheap elementwise ops:
in front, q|k|v through a causal depthwise conv, SiLU and (q, k) a per-head l2 norm; behind,
a per-head RMSNorm times a SiLU gate. Run as separate ops, autograd keeps every intermediate:
the conv output, the SiLU output and the norms in front (3 x C floats a token), the fp32 and the
normalised copies, the merged heads, the gate and its SiLU behind. Measured with saved-tensor
hooks on `NeuralMemory` at 2k tokens (dim 256, 4 heads): 32 MB of the layer's 143 MB lay
outside the memory op; with these two nodes, 14 MB. Each keeps its inputs and recomputes the
rest in backward: a few elementwise passes, against a memory op of ~7 MFLOP a token.

The plain compositions (`conv_silu_norm_reference`, `norm_gate_reference`) are the oracles
the tests compare against, forward and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.layers.precision import upcast

# F.normalize's default: x / max(||x||, eps)
NORM_EPS = 1e-12


# Elements (batch x tokens x channels) per block. CPU: each pass of these elementwise chains
# then works on ~1 MB that stays in cache, and its fp32 temporaries are block-sized heap reuse,
# not (L, C) tensors (~13 MB each at 4k tokens, 3 x dim channels): at 2k tokens the layer's
# peak RSS fell 35-40 MB and the conv's fwd+bwd ran 1.3-1.5x faster. GPU: one block up to
# 64 MB of fp32 (one launch per op at training lengths), so a long sequence's fp32 temporaries
# stay bounded instead of L x 3 dim x 4 bytes each.
CPU_BLOCK_ELEMS = 1 << 18
GPU_BLOCK_ELEMS = 1 << 24


def block_rows(x_BLC: Tensor) -> int:
    """Tokens per block for the nodes below (CPU_BLOCK_ELEMS / GPU_BLOCK_ELEMS worth)."""
    b, length, c = x_BLC.shape
    budget = CPU_BLOCK_ELEMS if x_BLC.device.type == "cpu" else GPU_BLOCK_ELEMS
    return max(1, min(length, budget // max(1, b * c)))


def _spans(length: int, rows: int) -> list[tuple[int, int]]:
    """(start, size) of consecutive token blocks covering 0..length."""
    return [(t0, min(rows, length - t0)) for t0 in range(0, length, rows)]


def _silu_slope(o: Tensor, sig: Tensor) -> Tensor:
    """d silu(o) / do = σ(o) (1 + o (1 - σ(o)))."""
    return sig * (1.0 + o * (1.0 - sig))


class _ConvSiluNorm(torch.autograd.Function):
    """out = silu(bias + Σ_j w[:, j] ⊙ full[:, t + j]), the first `norm_channels` channels then
    l2-normalised per group of `head_dim`. Computed in fp32 (float64 for float64 input,
    `models.layers.precision`), returned in full's dtype."""

    @staticmethod
    def _forward(
        full: Tensor, w: Tensor, bias: Tensor, length: int, norm_channels: int, head_dim: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        f = upcast(full)
        o = torch.addcmul(upcast(bias, f), f[:, :length], upcast(w[:, 0], f))
        for j in range(1, w.shape[1]):
            o.addcmul_(f[:, j : j + length], upcast(w[:, j], f))
        sig = torch.sigmoid(o)
        s = o * sig
        norm = None
        if norm_channels:
            part = s[..., :norm_channels].unflatten(-1, (-1, head_dim))
            norm = torch.linalg.vector_norm(part, dim=-1, keepdim=True).clamp_min_(NORM_EPS)
            part.div_(norm)  # s is fresh: its first channels become the normalised output
        return o, sig, s, norm

    @staticmethod
    def forward(
        full: Tensor,
        w: Tensor,
        bias: Tensor,
        length: int,
        norm_channels: int,
        head_dim: int,
        rows: int,
    ) -> Tensor:
        taps = w.shape[1]
        out = full.new_empty(full.shape[0], length, full.shape[2])
        for t0, n in _spans(length, rows):
            piece = full[:, t0 : t0 + n + taps - 1]
            out[:, t0 : t0 + n] = _ConvSiluNorm._forward(
                piece, w, bias, n, norm_channels, head_dim
            )[2]
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        full, w, bias, ctx.length, ctx.norm_channels, ctx.head_dim, ctx.rows = inputs
        ctx.save_for_backward(full, w, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        full, w, bias = ctx.saved_tensors
        nc, hd, taps = ctx.norm_channels, ctx.head_dim, w.shape[1]
        need_full, need_w, need_b = ctx.needs_input_grad[:3]
        w_f = upcast(w, full)
        g_full = w_f.new_zeros(full.shape) if need_full else None  # fp32, w's device
        g_w = w_f.new_zeros(w.shape) if need_w else None
        g_b = w_f.new_zeros(bias.shape) if need_b else None
        for t0, n in _spans(ctx.length, ctx.rows):
            piece = full[:, t0 : t0 + n + taps - 1]
            o, sig, y, norm = _ConvSiluNorm._forward(piece, w, bias, n, nc, hd)
            g = upcast(grad[:, t0 : t0 + n], full).clone()  # worked on in place
            if nc:
                # d(s / n) = (g - y (y . g)) / n where ||s|| > eps; plain g / eps where clamped
                yn, gn = (t[..., :nc].unflatten(-1, (-1, hd)) for t in (y, g))
                dot = (yn * gn).sum(-1, keepdim=True).masked_fill_(norm <= NORM_EPS, 0.0)
                gn.sub_(yn.mul_(dot)).div_(norm)
            del y
            # silu'(o) = σ (1 + o (1 - σ)), built in σ's memory
            g_o = g.mul_(sig.mul_((1.0 - sig).mul_(o).add_(1.0)))
            del o, sig
            f = upcast(piece)
            for j in range(taps):
                if g_full is not None:
                    g_full[:, t0 + j : t0 + j + n].addcmul_(g_o, w_f[:, j])
                if g_w is not None:
                    g_w[:, j] += (g_o * f[:, j : j + n]).sum((0, 1))
            if g_b is not None:
                g_b += g_o.sum((0, 1))
        return (
            None if g_full is None else g_full.to(full.dtype),
            None if g_w is None else g_w.to(w.dtype),
            None if g_b is None else g_b.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def conv_silu_norm(
    full_BJC: Tensor,
    weight_CK: Tensor,
    bias_C: Tensor,
    norm_channels: int = 0,
    head_dim: int = 1,
    rows: int | None = None,
) -> Tensor:
    """Causal depthwise conv over `full` = [K-1 cached inputs | L new ones] (B, K-1+L, C), then
    SiLU, then an l2 norm over each `head_dim` group of the first `norm_channels` channels.
    Returns (B, L, C) in full's dtype; autograd keeps only full, weight and bias.
    rows: tokens per block (default `block_rows`)."""
    taps = weight_CK.shape[1]
    length = full_BJC.shape[1] - (taps - 1)
    if norm_channels % head_dim or norm_channels > full_BJC.shape[-1]:
        raise ValueError(
            f"norm_channels={norm_channels} must be a multiple of head_dim={head_dim} and at most "
            f"the {full_BJC.shape[-1]} channels"
        )
    rows = rows or block_rows(full_BJC)
    return _ConvSiluNorm.apply(full_BJC, weight_CK, bias_C, length, norm_channels, head_dim, rows)


def conv_silu_norm_reference(
    full_BJC: Tensor, weight_CK: Tensor, bias_C: Tensor, norm_channels: int = 0, head_dim: int = 1
) -> Tensor:
    """The same function from plain ops (the oracle): conv1d, F.silu, F.normalize."""
    x = upcast(full_BJC).mT  # (B, C, K-1+L)
    w, b = upcast(weight_CK, x).unsqueeze(1), upcast(bias_C, x)
    o = F.conv1d(x, w, b, groups=x.shape[1]).mT
    s = F.silu(o)
    if norm_channels:
        part = F.normalize(s[..., :norm_channels].unflatten(-1, (-1, head_dim)), dim=-1)
        s = torch.cat([part.flatten(-2), s[..., norm_channels:]], dim=-1)
    return s.to(full_BJC.dtype)


class _NormGate(torch.autograd.Function):
    """(RMSNorm_D(y) ⊙ w) with heads merged, times silu(gate). fp32 inside (float64 for
    float64 y), gate's dtype out."""

    @staticmethod
    def _forward(y: Tensor, w: Tensor, eps: float, gate: Tensor) -> Tensor:
        yf = upcast(y)
        rstd = torch.rsqrt(yf.square().mean(-1, keepdim=True).add_(eps))
        a = (yf * rstd).mul_(upcast(w, yf)).transpose(1, 2).flatten(2)  # (B, L, H D)
        return a.mul_(F.silu(upcast(gate, yf)))

    @staticmethod
    def forward(y: Tensor, w: Tensor, eps: float, gate: Tensor, rows: int) -> Tensor:
        out = torch.empty_like(gate)
        for t0, n in _spans(y.shape[2], rows):
            out[:, t0 : t0 + n] = _NormGate._forward(
                y[:, :, t0 : t0 + n], w, eps, gate[:, t0 : t0 + n]
            )
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        y, w, ctx.eps, gate, ctx.rows = inputs
        ctx.save_for_backward(y, w, gate)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        y, w, gate = ctx.saved_tensors
        need_y, need_w, _, need_gate = ctx.needs_input_grad[:4]
        h, d = y.shape[1], y.shape[3]
        w_f = upcast(w, y)
        g_y = torch.empty_like(y) if need_y else None
        g_gate = torch.empty_like(gate) if need_gate else None
        g_w = w_f.new_zeros(w.shape) if need_w else None
        for t0, n in _spans(y.shape[2], ctx.rows):
            span = slice(t0, t0 + n)
            yf = upcast(y[:, :, span])
            gf, g = upcast(gate[:, span], yf), upcast(grad[:, span], yf)
            rstd = torch.rsqrt(yf.square().mean(-1, keepdim=True).add_(ctx.eps))
            yn = yf * rstd  # (B, H, n, D)
            sig = torch.sigmoid(gf)
            g_a = (g * (gf * sig)).unflatten(-1, (h, d)).transpose(1, 2)  # (B, H, n, D)
            if g_gate is not None:
                a = (yn * w_f).transpose(1, 2).flatten(2)
                g_gate[:, span] = (g * a).mul_(_silu_slope(gf, sig))
            if g_w is not None:
                g_w += (g_a * yn).sum((0, 1, 2))
            if g_y is not None:
                g_n = g_a * w_f
                dot = (g_n * yn).mean(-1, keepdim=True)
                g_y[:, :, span] = g_n.sub_(yn.mul_(dot)).mul_(rstd)
        return g_y, None if g_w is None else g_w.to(w.dtype), None, g_gate, None


def norm_gate(
    y_BHLD: Tensor, weight_D: Tensor, eps: float, gate_BLX: Tensor, rows: int | None = None
) -> Tensor:
    """RMSNorm over each head's D (weight `weight_D`), heads merged to (B, L, H D), times
    silu(gate) (B, L, H D). Autograd keeps only y, the weight and the gate.
    rows: tokens per block (default `block_rows`)."""
    b, h, length, d = y_BHLD.shape
    if gate_BLX.shape != (b, length, h * d):
        raise ValueError(f"gate shape {tuple(gate_BLX.shape)}, expected {(b, length, h * d)}")
    rows = rows or block_rows(gate_BLX)
    return _NormGate.apply(y_BHLD, weight_D, eps, gate_BLX, rows)


def norm_gate_reference(y_BHLD: Tensor, weight_D: Tensor, eps: float, gate_BLX: Tensor) -> Tensor:
    """The same function from plain ops (the oracle)."""
    yf = upcast(y_BHLD)
    yn = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps) * upcast(weight_D, yf)
    a = yn.transpose(1, 2).reshape(gate_BLX.shape)
    return (a * F.silu(upcast(gate_BLX, yf))).to(gate_BLX.dtype)
