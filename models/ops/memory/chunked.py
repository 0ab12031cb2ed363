"""Neural-memory op, chunked (tensorized) form: same function as `reference.py`, fast on CPU.

Legend as in reference.py: B batch, H heads, L length, n chunks of T = b tokens, Din / Dout
the memory's input / output width, G = B H (batch and heads are flattened so per-chunk
tensors are (G, T, ...) and the matmuls are plain bmm / baddbmm); states are (G, d_in, d_out).

Why it is exact. With every gradient of a chunk taken at the chunk-start weights W0, the
gradient of token i w.r.t. layer l is an outer product z_i δ_iᵀ (z_i = the layer's input at
key k_i, δ_i = the backpropagated output gradient), both from one batched forward/backward
of the MLP on the chunk's keys. Unrolling S_t = η_t S_{t-1} - θ_t u_t and
X_t = (1 - α_t) X_{t-1} + S_t inside the chunk gives

    X_t = β_t X0 + c_t S0 - Σ_{i<=t} C[t, i] z_i δ_iᵀ
    S_t = ε_t S0 - Σ_{i<=t} E[t, i] θ_i z_i δ_iᵀ
    β_t = Π_{j<=t}(1-α_j),  ε_t = Π_{j<=t} η_j,  A[t, s] = β_t / β_s,  E[s, i] = ε_s / ε_i,
    C = (A @ E) diag(θ),  c = A @ ε                 (no momentum: C = A diag(θ), c = 0)

with the ratios built as exp of segment sums of log-gates (no division, no overflow). So
retrieving token t with its own X_t never materialises per-token weights:

    a_t X_t = β_t (a_t X0) + c_t (a_t S0) - Σ_i C[t, i] (a_t · z_i) δ_i,

a causally masked "attention" (C ⊙ (Q Zᵀ)) Δ (the TTT dual form), applied layer by layer for
an MLP memory with a_t the retrieved activation of the previous layer. The chunk's final state
uses the last row of C. Only the writes are sequential (a chunk's gradients need the previous
chunk's end state): a Python loop walks them, a few batched matmuls each, with momentum and
weights stacked as one [X; S] tensor per layer (or [Xᵀ; Sᵀ], whichever scales the narrower
side) so both move in one op. The reads need only the chunk-start states, so every READ_GROUP
chunks one batched read serves them all; coefficients and read operands are built per group,
so no temporary is length-sized. Channel-wise gates
(theta, alpha (B, H, L, Din), reference.py "Gates") scale the first layer's rows: per row r the
same unrolling holds with β_t[r], A[t, s, r] = β_t[r] / β_s[r] and C[t, i, r] = A[t, i, r] θ_i[r]
(no momentum), so the write weighs z_i per channel (wc_i ⊙ z_i, still one outer product per
token), the carry scales X0's rows by β_end, and the read's layer-1 scores become
S[t, i] = Σ_r q_t[r] C[t, i, r] k_i[r] ((T, T, Din) per chunk, built from segment sums, never
1 / β); deeper layers use the channel means as scalar gates. Memory is
O(L (b + width)) with per-head gates, O(L b Din) with channel-wise ones (the (T, T, Din)
coefficients are kept for backward: 5.5x the saved tensors at depth 2, measured): autograd
keeps each chunk's activations and start state, or, with checkpoint=True, ~sqrt(n) states and
one group of chunks at a time.

This file holds the algorithm (write, read, the chunk loop and its checkpointing); its pieces:
chunked_coefficients.py (the coefficients above), chunked_state.py (the [X; S] state layout and
the chunking of inputs), chunked_autograd.py (the custom autograd nodes: the fused gelu, the
group matmul of the read and the Titans write with its hand-written backward).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from models.layers.precision import compute_dtype
from models.layers.segment_scan import checkpointed_scan
from models.ops.memory.chunked_autograd import _GeluPair, _GroupMatmul, _WriteL2
from models.ops.memory.chunked_coefficients import (
    _channel_coefficients,
    _coefficients,
    _layer_coef,
)
from models.ops.memory.chunked_state import (
    _blocks,
    _mix,
    _scale_rows,
    _to_chunks,
    _transposed,
    _update_operands,
)
from models.ops.memory.common import (
    ALPHA_MAX,
    DEFAULT_RULE,
    ETA_MIN,
    MemoryRule,
    MemoryState,
    channelwise_gates,
    effective_weights,
    init_state,
    layer_norm,
    lq_norm_factor,
    output_grad,
)


def _kl_retrieve(
    qc: Tensor,
    kc: Tensor,
    delta: Tensor,
    lam0: Tensor,
    s0: Tensor | None,
    coef: dict[str, Tensor],
    scale: float,
    lam_end: Tensor,
) -> Tensor:
    """Depth-1 Memora retrieval: first-order softmax expansion at the chunk start (docstring
    of reference.py), y_t = c (qP + T_t - qP ⊙ U_t) with T_t = q_t (P ⊙ D_t), U_t = 1ᵀ(P ⊙ D_t);
    the chunk's last row (coef["end"]) reads the exact c q_t softmax(Λ_end) instead.
    """
    p = torch.softmax(lam0, dim=-2)  # (G, Din, Dout)
    qp = qc @ p
    exact = qc @ torch.softmax(lam_end, dim=-2)
    if "C1" in coef:
        # Channel-wise decay (no momentum): D_t = (β_t - 1) ⊙_rows Λ0 - Σ_i C[t, i] ⊙_rows k_i δ_iᵀ
        pl = p * lam0
        bm1 = coef["bc1"][..., 0, :] - 1.0  # (G, T, Din)
        ck = coef["C1"] * kc.unsqueeze(-3)  # (G, T, T, Din): C[t, i, r] k_i[r]
        t_part = (qc * bm1) @ pl - (
            delta.unsqueeze(-3) * ((ck * qc.unsqueeze(-2)) @ p.unsqueeze(-3))
        ).sum(-2)
        u_part = bm1 @ pl - (delta.unsqueeze(-3) * (ck @ p.unsqueeze(-3))).sum(-2)
        return scale * torch.where(coef["end"], exact, qp + t_part - qp * u_part)
    bc = coef["bc"]  # (G, T, m, 1): [β_t, c_t]
    bm1 = bc[..., 0, :] - 1.0
    t_part = bm1 * (qc @ (p * lam0))
    u_part = bm1 * (p * lam0).sum(dim=-2, keepdim=True)
    if s0 is not None:
        t_part = t_part + bc[..., 1, :] * (qc @ (p * s0))
        u_part = u_part + bc[..., 1, :] * (p * s0).sum(dim=-2, keepdim=True)
    cmat = coef["C"]
    # qkp[t, i] = (q_t ⊙ k_i) P: (G, T, T, Dout); b² Din Dout work per chunk, depth-1 only.
    qkp = (qc.unsqueeze(-2) * kc.unsqueeze(-3)) @ p.unsqueeze(-3)
    t_part = t_part - (cmat.unsqueeze(-1) * delta.unsqueeze(-3) * qkp).sum(dim=-2)
    u_part = u_part - cmat @ (delta * (kc @ p))
    return scale * torch.where(coef["end"], exact, qp + t_part - qp * u_part)


def _write(
    sts: list[Tensor],
    kc: Tensor,
    rv: Tensor,
    dc: Tensor | None,
    co: dict[str, Tensor],
    rule: MemoryRule,
    m: int,
    trs: list[bool],
) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None, list[Tensor]]:
    """One chunk's write: gradients at the chunk-start weights and the end-of-chunk state.

    The only sequential work (the next chunk's gradients need this chunk's end state). States
    are (G, m d_in, d_out) = [X; S] stacked, so the two blocks move in one op: the end state is
    mix @ [X; S] - [(wc ⊙ Z)ᵀ; (hs ⊙ Z)ᵀ] Δ (transposed layers, `_transposed`: mix @ [Xᵀ; Sᵀ] -
    [(wc ⊙ Δ)ᵀ; (hs ⊙ Δ)ᵀ] Z). rv = (k if residual) - v, so the residual of the
    MLP's answer comes out of one baddbmm. For the l2 bias the factor 2 of g = 2 r is folded
    into theta (memory_chunked), so Δ = r here. Returns the read's inputs and the new state.
    """
    depth = len(sts)
    norm = rule.norm and depth >= 2
    if rule.attn_bias == "l2" and rule.retention == "l2" and not norm and "mix1" not in co:
        out = _WriteL2.apply(tuple(trs), m, kc, rv, co["mix"], co["wh"], *sts)
        return (
            [kc, *out[: depth - 1]],
            list(out[depth - 1 : 2 * depth - 1]),
            None,
            list(out[2 * depth - 1 :]),
        )
    xs = [_blocks(st, m, tr)[0] for st, tr in zip(sts, trs)]
    norms = [lq_norm_factor(x, rule) for x in xs] if rule.retention == "lq" else None
    w0 = [x / n for x, n in zip(xs, norms)] if norms else effective_weights(xs, rule)

    # Keys through the MLP at the chunk-start weights, then the analytic backward:
    # layer i's gradient for token j is the outer product zs[i][j] ⊗ deltas[i][j].
    zs, slopes, h = [kc], [], kc
    for i in range(depth - 1):
        h, slope = _GeluPair.apply(torch.bmm(h, w0[i]))
        slopes.append(slope)
        zs.append(h)
    if norm:
        # r = LN(o) + rv; the output gradient goes back through the LN:
        # δ = rstd (g - mean(g) - n mean(g ⊙ n)), n = LN(o)
        n_o, rstd = layer_norm(torch.bmm(h, w0[-1]), rule.norm_eps)
        r = n_o + rv
        g = r if rule.attn_bias == "l2" else output_grad(r, rule, dc)
        g_c = g - g.mean(-1, keepdim=True)
        dlt = (g_c - n_o * (g * n_o).mean(-1, keepdim=True)) * rstd
    else:
        r = torch.baddbmm(rv, h, w0[-1])
        dlt = r if rule.attn_bias == "l2" else output_grad(r, rule, dc)
    deltas = [dlt] * depth
    for i in range(depth - 1, 0, -1):
        dlt = torch.bmm(dlt, w0[i].mT) * slopes[i - 1]
        deltas[i - 1] = dlt

    new = [
        torch.baddbmm(
            _mix(_layer_coef(co, "mix", i), st, m),
            *_update_operands(_layer_coef(co, "wh", i), zs[i], deltas[i], tr),
            alpha=-1.0,
        )
        for i, (st, tr) in enumerate(zip(sts, trs))
    ]
    return zs, deltas, norms, new


def _read(
    sts: list[list[Tensor]],
    qc: Tensor,
    kc: Tensor,
    zs: list[list[Tensor]],
    deltas: list[list[Tensor]],
    norms: list[Tensor] | None,
    co: dict[str, Tensor],
    rule: MemoryRule,
    m: int,
    trs: list[bool],
    lam_end: Tensor | None = None,
) -> Tensor:
    """Retrieval: token t reads with its own post-write weights, layer by layer (dual form):

        a_t X_t = β_t (a_t X0) + c_t (a_t S0) - Σ_i C[t, i] (a_t · z_i) δ_i
                = ([β_t a_t, c_t a_t] @ [X0; S0]) - ((a Zᵀ) ⊙ C) Δ

    (a transposed layer: β_t (a [X0 | S0])[:d_out] + c_t (a [X0 | S0])[d_out:] - ...).

    Needs only the chunk-start states and the write's zs / deltas, so it runs batched over
    many chunks at once (the batch dim is chunks x G): large matmuls instead of a loop.
    sts, zs, deltas: per layer, the group's per-chunk pieces (G, ...), in chunk order.
    norms (lq): per layer and row the factor n(·) the row divides by, (chunks G, T, 1): the
    chunk-start one, the end state's on row T-1 (reference.py). lam_end (kl): the chunks' end
    states Λ (chunks G, Din, Dout), read exactly on row T-1 (co["end"], (T, 1)).
    """
    depth = len(sts)
    mm = _GroupMatmul.apply
    if rule.retention == "kl":
        x0, s0 = _blocks(torch.stack(sts[0]).flatten(0, 1), m, trs[0])
        return _kl_retrieve(qc, kc, torch.cat(deltas[0]), x0, s0, co, rule.simplex_scale, lam_end)
    # h: the layer's input before its activation (gelu between layers, none before layer 1);
    # where a product can fold the gelu in (_GroupMatmul), the activation is not kept.
    h = qc
    for i in range(depth):
        act = i > 0
        if trs[i]:
            if i == 0:  # layer 1's scores are built for all chunks up front (_group_operands)
                scores, y = co["qk"], mm(h, True, False, None, *sts[i])
            else:
                scores, y = mm(h, True, act, None, *zs[i], *sts[i])
            y0, y1 = y.chunk(2, dim=-1)
            base = torch.addcmul(y0 * co["bc"][..., 0, :], y1, co["bc"][..., 1, :])
        else:
            a = F.gelu(h) if act else h
            scores = co["qk"] if i == 0 else mm(a, True, False, None, *zs[i])
            if i == 0 and "q_bc" in co:
                base = mm(co["q_bc"], False, False, None, *sts[0])
            else:
                base = mm(_scale_rows(co["bc"], a), False, False, None, *sts[i])
        # (scores ⊙ C) Δ with the masked scores redone in backward, not kept; channel-wise
        # gates fold C1 into layer 1's scores (_group_operands)
        mask = None if i == 0 and "C1" in co else co["C"]
        h = base - mm(scores, False, False, mask, *deltas[i])
        if norms:
            h = h / norms[i]
    a = h
    if rule.norm and depth >= 2:
        a = layer_norm(a, rule.norm_eps)[0]
    if rule.residual and depth >= 2:
        a = a + qc
    return a


_WRITE_KEYS = ("mix", "wh", "rv")


# Chunks per batched read: enough to make the read's matmuls large, few enough that their
# operands (the chunks' states, zs, deltas) stay in cache. The coefficients and the read's operands
# are built per group too: every temporary is group-sized (~1 MB here with per-head gates; the
# channel-wise gates' (T, T, Din) coefficients are Din times that), not length-sized, so none
# is a fresh mmap that glibc page-faults in again (and unmaps) at every step.
READ_GROUP = 16


def _group_operands(
    q_r: Tensor,
    k_r: Tensor,
    v_r: Tensor,
    gates: dict[str, Tensor],
    last: int,
    rule: MemoryRule,
    depth: int,
    layer1_rows: bool,
) -> dict[str, Tensor]:
    """Coefficients of a group of chunks, plus what its writes and first read layer need
    without the weights: rv = (k if residual) - v, q ⊙ [β, c] and Q Kᵀ."""
    co = _coefficients(gates["th"], gates["lk"], gates.get("le"), last)
    if "th1" in gates:
        co.update(_channel_coefficients(gates["th1"], gates["lk1"], last))
    co["rv"] = k_r - v_r if rule.residual and depth >= 2 else -v_r
    if rule.retention != "kl":
        if layer1_rows:
            co["q_bc"] = _scale_rows(co.get("bc1", co["bc"]), q_r)
        if "C1" in co:  # S[t, i] = Σ_r q_t[r] C[t, i, r] k_i[r]
            co["qk"] = torch.einsum("...tr,...ir,...tir->...ti", q_r, k_r, co["C1"])
        else:
            co["qk"] = q_r @ k_r.mT
    return co


class _Chunks(NamedTuple):
    """The op's inputs cut into chunks, (n, G, T, ...): q, k, v, Huber's delta (None for the other
    biases) and the gates "th" (theta), "lk" (log keep) and "le" (log eta, with momentum), each
    (n, G, T); with channel-wise gates also "th1", "lk1" (n, G, T, Din) for the first layer."""

    q: Tensor
    k: Tensor
    v: Tensor
    dn: Tensor | None
    gates: dict[str, Tensor]


def _run_chunks(
    sts: list[Tensor], xs: _Chunks, last: int, rule: MemoryRule, m: int, trs: list[bool]
) -> tuple[Tensor, list[Tensor]]:
    """Consecutive chunks (the unit a checkpoint recomputes): the writes walk the chunks in
    order; every READ_GROUP chunks one batched read serves them all. `last`: the final chunk's
    last real row. Returns y (n, G, T, Dout) and the state after the last chunk."""
    qs, ks, vs, dn, gates = xs
    num, groups, size = ks.shape[:3]
    depth = len(sts)
    n_groups = -(-num // READ_GROUP)

    # split, not slices: a slice's backward writes a zero tensor of the full length each time
    split = [t.split(READ_GROUP) for t in (qs, ks, vs)]
    d_split = [None] * n_groups if dn is None else dn.split(READ_GROUP)
    g_parts = zip(*(g.split(READ_GROUP) for g in gates.values()))
    g_split = [dict(zip(gates, vals)) for vals in g_parts]
    ys = []
    for gi, (q_r, k_r, v_r) in enumerate(zip(*split)):
        end_row = last if gi == n_groups - 1 else size - 1
        co = _group_operands(q_r, k_r, v_r, g_split[gi], end_row, rule, depth, not trs[0])
        # unbind, not indexing: one backward node instead of a full-size zero gradient per chunk
        keys = _WRITE_KEYS + (("mix1", "wh1") if "mix1" in co else ())
        wco = {key: co.pop(key).unbind(0) for key in keys}
        k_u = k_r.unbind(0)
        d_u = [None] * len(k_u) if d_split[gi] is None else d_split[gi].unbind(0)
        starts, saved = [], []
        for c in range(len(k_u)):
            per = {key: wco[key][c] for key in keys if key != "rv"}
            zs, deltas, norms, new = _write(sts, k_u[c], wco["rv"][c], d_u[c], per, rule, m, trs)
            starts.append(sts)
            saved.append((zs, deltas, norms))
            sts = new
        st_all = [[st[i] for st in starts] for i in range(depth)]
        z_all = [[sv[0][i] for sv in saved] for i in range(depth)]
        d_all = [[sv[1][i] for sv in saved] for i in range(depth)]
        # A chunk's last row reads the exact map of the chunk's end state (reference.py).
        ends = starts[1:] + [sts]
        # Row T-1 only: a partial final chunk has no last row (its rows keep the start factor).
        end = (torch.arange(size, device=k_r.device) == size - 1).unsqueeze(-1)  # (T, 1)
        n_all = lam_end = None
        if saved[0][2] is not None:
            n_end = [sv[2] for sv in saved[1:]]
            n_end.append([lq_norm_factor(_blocks(st, m, tr)[0], rule) for st, tr in zip(sts, trs)])
            n_all = [
                torch.where(
                    end, torch.cat([ne[i] for ne in n_end]), torch.cat([sv[2][i] for sv in saved])
                )
                for i in range(depth)
            ]
        if rule.retention == "kl":
            lam_end = torch.cat([_blocks(e[0], m, trs[0])[0] for e in ends])
        rco = {key: val.flatten(0, 1) for key, val in co.items()}
        rco["end"] = end
        q_f, k_f = q_r.flatten(0, 1), k_r.flatten(0, 1)
        y = _read(st_all, q_f, k_f, z_all, d_all, n_all, rco, rule, m, trs, lam_end)
        ys.append(y.unflatten(0, (q_r.shape[0], groups)))
    return torch.cat(ys, dim=0), sts


def _run_checkpointed(
    sts: list[Tensor], xs: _Chunks, last: int, rule: MemoryRule, m: int, trs: list[bool]
) -> tuple[Tensor, list[Tensor]]:
    """`_run_chunks` with checkpoint=True: groups of ~sqrt(n) chunks through `checkpointed_scan`,
    so backward keeps ~sqrt(n) boundary states and recomputes one group at a time (activation
    memory grows like sqrt(L)).

    Not torch.utils.checkpoint: its non-reentrant form imports torch._dynamo, which imports
    triton: ~130 MB of RSS in a CPU process, more than the op's own activations at 2k tokens.
    The scan slices one tensor, so the chunked inputs travel packed on the last dim. Every chunk
    the scan runs ends at row T-1; the final chunk, which may end early (`last`), runs after it
    with its graph kept (one chunk's activations).
    """
    num, size = xs.k.shape[0], xs.k.shape[2]
    extra = ([] if xs.dn is None else [xs.dn]) + list(xs.gates.values())
    scalar = [t.dim() == 3 for t in extra]  # (n, G, T): packed as one column; channel-wise: Din
    parts = [xs.q, xs.k, xs.v, *(t.unsqueeze(-1) if s else t for t, s in zip(extra, scalar))]
    widths = [t.shape[-1] for t in parts]
    packed = torch.cat(parts, dim=-1).movedim(0, 1)  # (G, n, T, F): chunks on dim 1

    def unpack(x: Tensor) -> _Chunks:
        cols = [c.contiguous() for c in x.movedim(1, 0).split(widths, dim=-1)]
        rest = [c.squeeze(-1) if s else c for c, s in zip(cols[3:], scalar)]
        dn_x = rest.pop(0) if xs.dn is not None else None
        return _Chunks(cols[0], cols[1], cols[2], dn_x, dict(zip(xs.gates, rest)))

    def step(x_j: Tensor, s_j: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        y_j, s_next = _run_chunks(s_j, unpack(x_j), size - 1, rule, m, trs)
        return y_j.movedim(0, 1), s_next

    ys = []
    if num > 1:
        group = max(1, round(math.sqrt(num)))
        y_head, sts = checkpointed_scan(step, packed[:, :-1], sts, [], group)
        ys.append(y_head.movedim(1, 0))
    y_tail, sts = _run_chunks(sts, unpack(packed[:, -1:]), last, rule, m, trs)
    return torch.cat([*ys, y_tail], dim=0), sts


def memory_chunked(
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
) -> tuple[Tensor, MemoryState]:
    """Chunked neural-memory write + retrieve; same contract as `memory_reference`.

    q, k (B, H, L, Din); v (B, H, L, Dout); eta / huber_delta (B, H, L); theta / alpha
    (B, H, L), or (B, H, L, Din) channel-wise (reference.py, "Gates"); eta None = no momentum
    (Miras). Returns y (B, H, L, Dout) in q's dtype and the final state
    in the compute dtype (float64 for float64 q, float32 otherwise; reference.py's docstring).
    checkpoint=True recomputes the chunks in backward from ~sqrt(n) saved boundary states
    (about a third more compute; the memory of the loop grows like sqrt(L), not L).
    """
    rule.check(state.weights)
    channelwise = channelwise_gates(theta, alpha, eta, k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if rule.attn_bias == "huber" and huber_delta is None:
        raise ValueError("attn_bias='huber' needs huber_delta (B, H, L)")
    bsz, heads, length, _ = k.shape
    size, groups = chunk_size, bsz * heads
    num = -(-length // size)
    last = (length - 1) % size
    cd = compute_dtype(q.dtype)
    st = init_state(state.weights, state.momentum, bsz, eta is not None, cd)
    m = 1 if st.momentum is None else 2

    def flat(t: Tensor) -> Tensor:  # (B, H, ...) -> (G, ...) in the compute dtype
        return t.to(cd).reshape(groups, *t.shape[2:])

    # Per layer one state: [X; S] (G, m d_in, d_out), or [Xᵀ; Sᵀ] (`_transposed`, see _write).
    trs = _transposed(st.weights, m, rule)
    sts = [flat(x).mT if tr else flat(x) for x, tr in zip(st.weights, trs)]
    if m == 2:
        moms = [flat(s).mT if tr else flat(s) for s, tr in zip(st.momentum, trs)]
        sts = [torch.cat([x, s], dim=-2) for x, s in zip(sts, moms)]
    # Padded tokens get theta = 0, alpha = 0, eta = 1: they never touch rows <= last.
    qs, ks = _to_chunks(flat(q), num, size, 0.0), _to_chunks(flat(k), num, size, 0.0)
    vs = _to_chunks(flat(v), num, size, 0.0)
    # l2 bias: g = 2 r, and every coefficient that multiplies g is linear in theta.
    th, al = flat(theta), flat(alpha)
    th = th * 2.0 if rule.attn_bias == "l2" else th
    gates = {}
    if channelwise:  # the first layer's rows per channel, deeper layers the channel means
        gates["th1"] = _to_chunks(th, num, size, 0.0)
        gates["lk1"] = _to_chunks(torch.log1p(-al.clamp(max=ALPHA_MAX)), num, size, 0.0)
        th, al = th.mean(-1), al.mean(-1)
    gates["th"] = _to_chunks(th, num, size, 0.0)
    gates["lk"] = _to_chunks(torch.log1p(-al.clamp(max=ALPHA_MAX)), num, size, 0.0)
    if eta is not None:
        gates["le"] = _to_chunks(torch.log(flat(eta).clamp(min=ETA_MIN)), num, size, 0.0)
    dn = None
    if huber_delta is not None:
        dn = _to_chunks(flat(huber_delta), num, size, 1.0)

    if checkpoint and torch.is_grad_enabled():
        y, sts = _run_checkpointed(sts, _Chunks(qs, ks, vs, dn, gates), last, rule, m, trs)
    else:
        y, sts = _run_chunks(sts, _Chunks(qs, ks, vs, dn, gates), last, rule, m, trs)

    y = y.movedim(0, 1).flatten(1, 2)  # (n, G, T, D) -> (G, n T, D)
    y = y[:, :length].reshape(bsz, heads, length, -1).to(q.dtype)
    # The state is carried across pieces and checkpoint boundaries: copy it out so it does not
    # keep the per-chunk tensors it was sliced from alive (O(L) memory at 2M tokens).
    unflat = lambda t: t.reshape(bsz, heads, *t.shape[1:]).clone()
    blocks = [_blocks(st, m, tr) for st, tr in zip(sts, trs)]
    mom = None if m == 1 else tuple(unflat(b[1]) for b in blocks)
    return y, MemoryState(tuple(unflat(b[0]) for b in blocks), mom)
