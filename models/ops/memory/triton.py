"""Neural-memory op in Triton: the chunk-parallel Titans update, same contract as chunked.py.

`memory_triton(...)` takes `memory_chunked`'s arguments and returns (y, MemoryState). Covered:
attn_bias "l2" + retention "l2", with or without momentum, depth 1 (M(x) = x W) and depth 2
(M(x) = [x +] gelu(x W1) W2, without the optional LayerNorm `MemoryRule.norm`), fp32 / bf16 /
fp16 inputs; forward and backward both run in Triton (kernels and their layout:
triton_kernels.py). `unsupported_reason` says why other arguments are refused, so
`neural_memory(impl="auto")` can fall back to the chunked form.

Memory: the forward stores the state at every chunk start, O(L/b · D²) per (batch, head),
which the backward walks in reverse instead of re-scanning the sequence. Kernels compute in
fp32 (IEEE dots for fp32 inputs, TF32 for bf16/fp16). On CPU tensors this needs
TRITON_INTERPRET=1 set before this module is first imported (``triton.jit`` reads it then).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
import triton
from torch import Tensor
from triton.runtime.errors import OutOfResources

from models.ops.memory.common import (
    ALPHA_MAX,
    DEFAULT_RULE,
    ETA_MIN,
    MemoryRule,
    MemoryState,
    init_state,
)
from models.ops.memory.triton_kernels import (
    _lin_bwd_kernel,
    _lin_fwd_kernel,
    _mlp_bwd_kernel,
    _mlp_fwd_kernel,
    _mlp_part_kernel,
    _mlp_split_bwd_out_kernel,
    _mlp_split_bwd_state_kernel,
    _mlp_split_bwd_sum_kernel,
    _mlp_split_fwd_kernel,
)

MAX_DIM = 128  # DK and DV live whole in one tile (a DK x BV state tile, BT x DK key tiles)

# triton.jit chose between compiling and interpreting when the kernels were imported
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the accuracy path: no TF32 rounding inside the dots
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2(n: int, cap: int | None = None) -> int:
    tile = max(16, triton.next_power_of_2(n))  # tl.dot needs every dim >= 16
    return tile if cap is None else min(tile, max(16, cap))


# kernel name -> the tile it last ran with (benchmarks/memory_triton_tiles.py reports it)
LAUNCHED: dict[str, int] = {}


def _shrinking(launch: Callable[[int], None], tile: int, name: str) -> int:
    """Run `launch(tile)`; when the kernel needs more shared memory than this GPU has, halve
    the tile (down to 16) and retry. Why: what fits differs by GPU and Triton version (an H100
    refused the default pipelining at BT = BV = 64); returns the tile that ran."""
    while True:
        try:
            launch(tile)
            LAUNCHED[name] = tile
            return tile
        except OutOfResources:
            if tile <= 16:
                raise
            tile //= 2


def _log_gates(alpha: Tensor, eta: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """log(1-α), log η with the fast paths' bounds (common.py; chunked.py uses the same)."""
    lk = torch.log1p(-alpha.clamp(max=ALPHA_MAX))
    return lk, None if eta is None else torch.log(eta.clamp(min=ETA_MIN))


def _gate_grads(
    alpha: Tensor, eta: Tensor | None, dlk: Tensor, dle: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Map the kernels' log-gate gradients back to α, η through the same clamps."""
    with torch.enable_grad():
        a = alpha.detach().requires_grad_()
        e = None if eta is None else eta.detach().requires_grad_()
        lk, le = _log_gates(a, e)
        outs, grads, leaves = [lk], [dlk], [a]
        if e is not None:
            outs, grads, leaves = outs + [le], grads + [dle], leaves + [e]
        res = torch.autograd.grad(outs, leaves, grads)
    return res[0], None if e is None else res[1]


class _LinearFn(torch.autograd.Function):
    """Depth-1 memory: Triton forward and backward. Tensors (G, ...) fp32 contiguous."""

    @staticmethod
    def forward(ctx, cfg, q, k, v, theta, alpha, eta, w0, s0):  # noqa: ANN001
        chunk, block_v, prec, warps = cfg
        G, L, DK = q.shape
        DV = v.shape[-1]
        NT = triton.cdiv(L, chunk)
        BT, BK, BV = _pow2(chunk), _pow2(DK), _pow2(DV, block_v)
        mom = eta is not None
        lk, le = _log_gates(alpha, eta)
        ws = q.new_empty(G, NT + 1, DK, DV)
        ws[:, 0] = w0
        ss = q.new_empty(G, NT + 1, DK, DV) if mom else ws
        if mom:
            ss[:, 0] = s0
        y = q.new_empty(G, L, DV)

        def launch(bv: int) -> None:
            _lin_fwd_kernel[(triton.cdiv(DV, bv), G)](
                q, k, v, theta, lk, le if mom else lk, ws, ss, y, L, NT, chunk,
                DK=DK, DV=DV, BT=BT, BK=BK, BV=bv, MOM=mom, PREC=prec, num_warps=warps[0],
                num_stages=warps[1],
            )  # fmt: skip

        BV = _shrinking(launch, BV, "lin_fwd")
        ctx.save_for_backward(q, k, v, theta, alpha, eta, lk, le, ws, ss)
        ctx.cfg, ctx.tiles = cfg, (BT, BK, BV)
        if not mom:
            return y, ws[:, NT].clone()
        return y, ws[:, NT].clone(), ss[:, NT].clone()

    @staticmethod
    def backward(ctx, dy, dwe, dse=None):  # noqa: ANN001
        q, k, v, theta, alpha, eta, lk, le, ws, ss = ctx.saved_tensors
        chunk, _, prec, warps = ctx.cfg
        BT, BK, BV = ctx.tiles
        G, L, DK = q.shape
        DV = v.shape[-1]
        NT = triton.cdiv(L, chunk)
        mom = eta is not None
        dy, dwe = dy.contiguous(), dwe.contiguous()
        dse = dse.contiguous() if mom else dwe
        dv, dw0 = torch.empty_like(v), q.new_empty(G, DK, DV)
        ds0 = q.new_empty(G, DK, DV) if mom else dw0

        def launch(bv: int) -> None:
            nonlocal dq, dk, dth, dlk, dle
            # dq, dk and the gate gradients sum over Dout tiles: one partial per tile
            nv = triton.cdiv(DV, bv)
            dq, dk = q.new_empty(nv, G, L, DK), q.new_empty(nv, G, L, DK)
            dth, dlk = q.new_empty(nv, G, L), q.new_empty(nv, G, L)
            dle = q.new_empty(nv, G, L) if mom else dlk
            _lin_bwd_kernel[(nv, G)](
                q, k, v, theta, lk, le if mom else lk, ws, ss, dy, dwe, dse,
                dq, dk, dv, dth, dlk, dle, dw0, ds0, G, L, NT, chunk,
                DK=DK, DV=DV, BT=BT, BK=BK, BV=bv, MOM=mom, PREC=prec, num_warps=warps[2],
                num_stages=warps[1],
            )  # fmt: skip

        dq = dk = dth = dlk = dle = q
        _shrinking(launch, BV, "lin_bwd")
        dalpha, deta = _gate_grads(alpha, eta, dlk.sum(0), dle.sum(0) if mom else None)
        return (
            None, dq.sum(0), dk.sum(0), dv, dth.sum(0), dalpha, deta, dw0, ds0 if mom else None
        )  # fmt: skip


def _chunk_states(
    w1: Tensor, w2: Tensor, s1: Tensor | None, s2: Tensor | None, nt: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(G, NT + 1, ...) buffers of every chunk-start state, slot 0 the initial one; without
    momentum (s1 None) the momentum buffers are the weight buffers (the kernels skip them)."""
    out = []
    for w in (w1, w2) if s1 is None else (w1, w2, s1, s2):
        buf = w.new_empty(w.shape[0], nt + 1, *w.shape[1:])
        buf[:, 0] = w
        out.append(buf)
    return (*out, *out) if s1 is None else tuple(out)


def _walk_forward(args: tuple, y: Tensor, NT: int, chunk: int, kw: dict) -> None:
    """Depth-2 forward, one program per (batch, head) walking the hidden tiles."""
    G, L = args[0].shape[:2]
    _mlp_fwd_kernel[(G,)](*args, y, L, NT, chunk, **kw)


def _split_forward(args: tuple, y: Tensor, NT: int, chunk: int, kw: dict) -> Tensor:
    """Depth-2 forward, a program per (hidden tile, batch, head), one launch per chunk (plus
    chunk 0's M(k) partials before and the last chunk's y after). Returns δ2 per chunk, which
    the backward reads instead of recomputing it."""
    q, k, w1s, w2s = args[0], args[1], args[6], args[7]
    G, L = q.shape[:2]
    BT, BV = kw["BT"], kw["BV"]
    S = triton.cdiv(kw["DN"], kw["BN"])
    pd, yp = q.new_zeros(2, G, S, BT, BV), q.new_zeros(2, G, S, BT, BV)
    d2s = q.new_empty(G, NT, BT, BV)
    part_kw = {n: v for n, v in kw.items() if n != "MOM"}
    _mlp_part_kernel[(S, G)](
        q, k, w1s, w2s, pd[0], yp[0], y, L, NT, chunk, 0, S, REDUCE_Y=False, **part_kw
    )
    for i_c in range(NT):
        _mlp_split_fwd_kernel[(S, G)](*args, pd, yp, d2s, y, G, L, NT, chunk, i_c, S, **kw)
    last = yp[(NT - 1) % 2]  # only its y sum runs: i_c = NT has no chunk
    _mlp_part_kernel[(1, G)](
        q, k, w1s, w2s, pd[0], last, y, L, NT, chunk, NT, S, REDUCE_Y=True, **part_kw
    )
    return d2s


def _walk_backward(
    args: tuple, saved: Tensor | None, grads: tuple, slots: tuple, NT: int, chunk: int, kw: dict
) -> None:
    """Depth-2 backward, one program per (batch, head), chunks in reverse."""
    del saved
    G, L = args[0].shape[:2]
    _mlp_bwd_kernel[(G,)](*args, *grads[:1], *slots, *grads[1:], L, NT, chunk, **kw)


def _split_backward(
    args: tuple, d2s: Tensor, grads: tuple, slots: tuple, NT: int, chunk: int, kw: dict
) -> None:
    """Depth-2 backward, a program per (hidden tile, batch, head), two launches per chunk
    (pass-2 partials with the previous chunk's input gradients beside them; pass 3)."""
    q = args[0]
    G, L = q.shape[:2]
    BT, BK, BV = kw["BT"], kw["BK"], kw["BV"]
    S = triton.cdiv(kw["DN"], kw["BN"])
    g2p, hdp = q.new_zeros(2, G, S, BT, BT), q.new_zeros(2, G, S, BT, BT)
    dd2p = q.new_zeros(2, G, S, BT, BV)
    dqp, dkp = q.new_zeros(2, G, S, BT, BK), q.new_zeros(2, G, S, BT, BK)
    vp = q.new_zeros(2, G, S, 8, BT)
    out_kw = {n: v for n, v in kw.items() if n not in ("DN", "BN")}
    dy, outs = grads[0], grads[1:]
    rows = args[:6]
    states = (*args[6:], dy, *slots)
    for i_r in range(NT):
        i_c = NT - 1 - i_r
        _mlp_split_bwd_sum_kernel[(S + 1, G)](
            *rows, *states, d2s, g2p, hdp, dd2p, dqp, dkp, vp, *outs,
            G, L, NT, chunk, i_c, i_r, S, **kw,
        )  # fmt: skip
        _mlp_split_bwd_state_kernel[(S, G)](
            *rows, *states, d2s, g2p, dd2p, dkp, G, L, NT, chunk, i_c, i_r, S, **kw
        )
    _mlp_split_bwd_out_kernel[(1, G)](
        *rows, dy, d2s, g2p, hdp, dd2p, dqp, dkp, vp, *outs, L, NT, chunk, S, **out_kw
    )


class _MLPFn(torch.autograd.Function):
    """Depth-2 memory: Triton forward and backward. Tensors (G, ...) fp32 contiguous. The
    kernels either walk the hidden tiles in one program per (batch, head) or split them across
    programs with a few launches per chunk (cfg's split; triton_kernels.py)."""

    @staticmethod
    def forward(ctx, cfg, q, k, v, theta, alpha, eta, w1, w2, s1, s2):  # noqa: ANN001
        chunk, block_n, prec, residual, warps, split = cfg
        G, L, DK = q.shape
        DN, DV = w1.shape[-1], v.shape[-1]
        NT = triton.cdiv(L, chunk)
        mom = eta is not None
        lk, le = _log_gates(alpha, eta)
        w1s, w2s, s1s, s2s = _chunk_states(w1, w2, s1 if mom else None, s2, NT)
        y = q.new_empty(G, L, DV)
        tiles = dict(DK=DK, DN=DN, DV=DV, BT=_pow2(chunk), BK=_pow2(DK), BV=_pow2(DV))
        tiles.update(MOM=mom, RESIDUAL=residual, PREC=prec)
        args = (q, k, v, theta, lk, le if mom else lk, w1s, w2s, s1s, s2s)
        run = _split_forward if split else _walk_forward

        kept: list[Tensor | None] = [None]

        def launch(bn: int) -> None:
            kw = dict(tiles, BN=bn, num_warps=warps[0], num_stages=warps[1])
            kept[0] = run(args, y, NT, chunk, kw)

        name = "mlp_split_fwd" if split else "mlp_fwd"
        tiles["BN"] = _shrinking(launch, _pow2(DN, block_n), name)
        ctx.save_for_backward(q, k, v, theta, alpha, eta, lk, le, w1s, w2s, s1s, s2s, kept[0])
        ctx.cfg, ctx.tiles = cfg, tiles
        out = (y, w1s[:, NT].clone(), w2s[:, NT].clone())
        return out + ((s1s[:, NT].clone(), s2s[:, NT].clone()) if mom else ())

    @staticmethod
    def backward(ctx, dy, dw1e, dw2e, ds1e=None, ds2e=None):  # noqa: ANN001
        q, k, v, theta, alpha, eta, lk, le, w1s, w2s, s1s, s2s, d2s = ctx.saved_tensors
        chunk, _, _, _, warps, split = ctx.cfg
        G, L, DK = q.shape
        DN, DV = w1s.shape[-1], v.shape[-1]
        NT = triton.cdiv(L, chunk)
        mom = eta is not None
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dth, dlk = torch.empty_like(theta), torch.empty_like(theta)
        dle = torch.empty_like(theta) if mom else dlk
        args = (q, k, v, theta, lk, le if mom else lk, w1s, w2s, s1s, s2s)
        grads = (dy.contiguous(), dq, dk, dv, dth, dlk, dle)
        run = _split_backward if split else _walk_backward
        slots: list[Tensor] = []

        def launch(bn: int) -> None:
            # dstate ping-pongs between two slots per (batch, head): chunk i_r reads slot
            # i_r % 2; seeded afresh on every try (a refused launch may follow one that ran)
            dw1, dw2 = q.new_empty(G, 2, DK, DN), q.new_empty(G, 2, DN, DV)
            dw1[:, 0], dw2[:, 0] = dw1e, dw2e
            ds1, ds2 = dw1, dw2
            if mom:
                ds1, ds2 = q.new_empty(G, 2, DK, DN), q.new_empty(G, 2, DN, DV)
                ds1[:, 0], ds2[:, 0] = ds1e, ds2e
            slots[:] = [dw1, dw2, ds1, ds2]
            kw = dict(ctx.tiles, BN=bn, num_warps=warps[2], num_stages=warps[1])
            run(args, d2s, grads, tuple(slots), NT, chunk, kw)

        _shrinking(launch, ctx.tiles["BN"], "mlp_split_bwd" if split else "mlp_bwd")
        dw1, dw2, ds1, ds2 = slots
        dalpha, deta = _gate_grads(alpha, eta, dlk, dle if mom else None)
        slot = NT % 2
        ds = (ds1[:, slot], ds2[:, slot]) if mom else (None, None)
        return None, dq, dk, dv, dth, dalpha, deta, dw1[:, slot], dw2[:, slot], *ds


def unsupported_reason(
    q: Tensor,
    v: Tensor,
    state: MemoryState,
    rule: MemoryRule,
    theta: Tensor | None = None,
    alpha: Tensor | None = None,
) -> str | None:
    """Why the Triton path cannot run these arguments (None when it can); "auto" falls back.

    theta, alpha: the step and decay gates, to refuse channel-wise ones ((B, H, L, Din),
    reference.py "Gates"): the kernels load one theta / alpha per (head, token); per-channel
    decays would need a per-row carry and (T, T, Din) layer-1 scores they do not build. Either
    one channel-wise is refused (a mix would be read as a wrong-shaped buffer).
    """
    for name, g in (("theta", theta), ("alpha", alpha)):
        if g is not None and g.dim() == 4:
            return (
                "the Triton memory covers one theta / alpha per head and token; got channel-wise "
                f"{name} {tuple(g.shape)} (use impl='chunked')"
            )
    if rule.attn_bias != "l2" or rule.retention != "l2":
        return (
            f"the Triton memory covers attn_bias='l2', retention='l2' only; got "
            f"attn_bias={rule.attn_bias!r}, retention={rule.retention!r} (use impl='chunked')"
        )
    depth = len(state.weights)
    if depth not in (1, 2):
        return f"the Triton memory covers depth 1 and 2; got depth {depth} (use impl='chunked')"
    if rule.norm and depth >= 2:
        return (
            "the Triton memory covers M(x) = [x +] MLP(x) without the LayerNorm; got "
            "rule.norm=True (use impl='chunked', or a rule with norm=False)"
        )
    if q.dtype == torch.float64:
        return (
            "the Triton memory computes in float32; float64 inputs compute in float64 "
            "(use impl='chunked')"
        )
    if max(q.shape[-1], v.shape[-1]) > MAX_DIM:
        return f"the Triton memory needs head dims <= {MAX_DIM}; got {q.shape[-1]}, {v.shape[-1]}"
    if not q.is_cuda and not _INTERPRETED:
        return (
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before "
            "models.ops.memory.triton is first imported (or use impl='chunked')"
        )
    return None


def memory_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    alpha: Tensor,
    eta: Tensor | None,
    state: MemoryState,
    chunk_size: int,
    rule: MemoryRule = DEFAULT_RULE,
    huber_delta: Tensor | None = None,
    checkpoint: bool = False,
    *,
    block_v: int = 64,
    block_n: int = 32,
    num_warps: tuple[int, int] | None = None,
    num_stages: int = 1,
    precision: str | None = None,
    split: bool | None = None,
) -> tuple[Tensor, MemoryState]:
    """Chunked neural-memory write + retrieve in Triton; same contract as `memory_chunked`.

    huber_delta is unused (l2 bias only) and checkpoint is accepted for signature parity: this
    path already keeps only chunk-start states for backward. The kernels compute in fp32 (TF32
    dots for bf16/fp16 q); y comes back in q's dtype and the state in fp32. block_v caps the
    depth-1 Dout tile, block_n the depth-2 hidden tile (tests lower them to get several tiles).
    num_warps (forward, backward; default (4, 8) at depth 1, (8, 8) at depth 2) and num_stages
    are launch settings (benchmarks/memory_triton_tiles.py sweeps them on a GPU). precision
    overrides the dots' operand rounding ("ieee" or "tf32"; default: ieee for fp32 q, tf32
    otherwise); accumulation and the state stay fp32 either way. (bf16 dot operands were
    tried: Triton 3.6 kernels with them hit illegal memory accesses on an H100.)
    split (depth 2): a program per (hidden tile, batch, head) and three launches per chunk,
    not one program per (batch, head) walking the tiles; None = split on CUDA while B·H is
    below the GPU's SM count (an H100 at B·H = 4 ran 1.9-3.3x faster split, measured with an
    earlier six-launch form of these kernels). It keeps δ2, (B·H, L, Dout) fp32, for backward.
    """
    del huber_delta, checkpoint
    rule.check(state.weights)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    reason = unsupported_reason(q, v, state, rule, theta, alpha)
    if reason is not None:
        raise ValueError(reason)
    bsz, heads, length, _ = k.shape
    st = init_state(state.weights, state.momentum, bsz, eta is not None)
    if length == 0:
        return q.new_empty(bsz, heads, 0, v.shape[-1]), st
    groups = bsz * heads

    def flat(t: Tensor) -> Tensor:  # (B, H, ...) -> (G, ...) fp32 contiguous
        return t.float().reshape(groups, *t.shape[2:]).contiguous()

    args = [flat(t) for t in (q, k, v, theta, alpha)] + [None if eta is None else flat(eta)]
    xs = [flat(x) for x in st.weights]
    ss = [flat(s) for s in st.momentum] if st.momentum is not None else [None] * len(xs)
    if precision not in (None, "ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    prec = precision or _precision(q.dtype)
    if split is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 0
        split = groups < sms
    fwd_w, bwd_w = num_warps or ((4, 8) if len(xs) == 1 else (8, 8))
    launch = (fwd_w, num_stages, bwd_w)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if len(xs) == 1:
            out = _LinearFn.apply((chunk_size, block_v, prec, launch), *args, xs[0], ss[0])
        else:
            cfg = (chunk_size, block_n, prec, rule.residual, launch, split)
            out = _MLPFn.apply(cfg, *args, *xs, *ss)
    y, states = out[0], out[1:]
    unflat = lambda t: t.reshape(bsz, heads, *t.shape[1:])
    y = unflat(y).to(q.dtype)
    depth = len(xs)
    mom = tuple(unflat(s) for s in states[depth:]) if eta is not None else None
    return y, MemoryState(tuple(unflat(x) for x in states[:depth]), mom)
