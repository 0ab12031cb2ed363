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
uses the last row of C. Chunks are walked in order by a Python loop; everything per chunk is a
few batched matmuls. Memory is O(L (b + width)): autograd keeps each chunk's activations and
start state, or, with checkpoint=True, ~sqrt(n) states and one group of chunks at a time.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from models.ops.memory.reference import (
    DEFAULT_RULE,
    MemoryRule,
    MemoryState,
    effective_weights,
    init_state,
    lq_norm_factor,
    output_grad,
)

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# alpha == 1 or eta == 0 would give log(0) = -inf whose gradient is NaN; these bounds change the
# gates by less than fp32 resolution (alpha) or leave a 1e-30 momentum carry (eta).
_ALPHA_MAX = 1.0 - 2.0**-24
_ETA_MIN = 1e-30


class _GeluGradMul(torch.autograd.Function):
    """t ⊙ gelu'(x) with gelu' = Φ + x φ, saving (t, x) rather than the gelu' tensor.

    Backward uses d gelu' / dx = φ (2 - x²): exact second derivative, needed because the inner
    gradient is itself differentiated by the outer training step.
    """

    @staticmethod
    def forward(t: Tensor, x: Tensor) -> Tensor:
        cdf = 0.5 * (1.0 + torch.erf(x * _SQRT1_2))
        return t * (cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        t, x = ctx.saved_tensors
        cdf = 0.5 * (1.0 + torch.erf(x * _SQRT1_2))
        pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return grad * (cdf + x * pdf), grad * t * pdf * (2.0 - x * x)


def _segsum(x: Tensor) -> Tensor:
    """out[..., t, s] = Σ_{s<j<=t} x[..., j] for s <= t and -inf above the diagonal.

    Summing the masked segment directly (not a difference of cumsums) keeps log-decays exact.
    """
    t = x.shape[-1]
    ones = torch.ones(t, t, dtype=torch.bool, device=x.device)
    xr = x.unsqueeze(-1).expand(*x.shape, t).masked_fill(~torch.tril(ones, -1), 0.0)
    return xr.cumsum(dim=-2).masked_fill(~torch.tril(ones), float("-inf"))


def _to_chunks(x: Tensor, num: int, size: int, pad_value: float) -> Tensor:
    """(G, L, ...) -> (n, G, T, ...) contiguous, padding the last chunk with pad_value."""
    pad = num * size - x.shape[1]
    if pad:
        widths = [0, 0] * (x.dim() - 2) + [0, pad]
        x = F.pad(x, widths, value=pad_value)
    x = x.reshape(x.shape[0], num, size, *x.shape[2:])
    return x.movedim(1, 0).contiguous()


def _end_rows(x: Tensor, last: int) -> Tensor:
    """Row t = T-1 of every chunk (n, G, T, ...), except row `last` of a partial final one."""
    if last == x.shape[2] - 1:
        return x[:, :, -1]
    return torch.cat([x[:-1, :, -1], x[-1:, :, last]], dim=0)


def _kl_retrieve(
    qc: Tensor,
    kc: Tensor,
    delta: Tensor,
    lam0: Tensor,
    s0: Tensor | None,
    coef: dict[str, Tensor],
    scale: float,
) -> Tensor:
    """Depth-1 Memora retrieval: first-order softmax expansion at the chunk start (docstring
    of reference.py), y_t = c (qP + T_t - qP ⊙ U_t) with T_t = q_t (P ⊙ D_t), U_t = 1ᵀ(P ⊙ D_t).
    """
    p = torch.softmax(lam0, dim=-2)  # (G, Din, Dout)
    qp = qc @ p
    bm1 = coef["beta"] - 1.0
    t_part = bm1 * (qc @ (p * lam0))
    u_part = bm1 * (p * lam0).sum(dim=-2, keepdim=True)
    if s0 is not None:
        t_part = t_part + coef["cs"] * (qc @ (p * s0))
        u_part = u_part + coef["cs"] * (p * s0).sum(dim=-2, keepdim=True)
    cmat = coef["C"]
    # qkp[t, i] = (q_t ⊙ k_i) P: (G, T, T, Dout); b² Din Dout work per chunk, depth-1 only.
    qkp = (qc.unsqueeze(-2) * kc.unsqueeze(-3)) @ p.unsqueeze(-3)
    t_part = t_part - (cmat.unsqueeze(-1) * delta.unsqueeze(-3) * qkp).sum(dim=-2)
    u_part = u_part - cmat @ (delta * (kc @ p))
    return scale * (qp + t_part - qp * u_part)


def _coefficients(
    theta: Tensor, alpha: Tensor, eta: Tensor | None, num: int, size: int, last: int
) -> dict[str, Tensor]:
    """Decay / momentum coefficients of every chunk at once, (n, G, T, ...) with G = B H."""
    th = _to_chunks(theta, num, size, 0.0)
    log_keep = _to_chunks(torch.log1p(-alpha.clamp(max=_ALPHA_MAX)), num, size, 0.0)
    amat = torch.exp(_segsum(log_keep))  # A[t, s] = β_t / β_s
    beta = torch.exp(log_keep.cumsum(dim=-1))
    co = {"beta": beta.unsqueeze(-1), "beta_end": _end_rows(beta, last)[..., None, None]}
    if eta is None:
        cmat = amat * th.unsqueeze(-2)
    else:
        log_eta = _to_chunks(torch.log(eta.clamp(min=_ETA_MIN)), num, size, 0.0)
        emat = torch.exp(_segsum(log_eta))  # E[s, i] = ε_s / ε_i
        ev = torch.exp(log_eta.cumsum(dim=-1))
        cmat = (amat @ emat) * th.unsqueeze(-2)
        cs = (amat @ ev.unsqueeze(-1)).squeeze(-1)
        co["cs"] = cs.unsqueeze(-1)
        co["cs_end"] = _end_rows(cs, last)[..., None, None]
        co["ev_end"] = _end_rows(ev, last)[..., None, None]
        co["hs_end"] = (_end_rows(emat, last) * th).unsqueeze(-1)
    co["C"] = cmat
    co["wc_end"] = _end_rows(cmat, last).unsqueeze(-1)
    return co


def _chunk_step(
    xs: list[Tensor],
    ss: list[Tensor] | None,
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    dc: Tensor | None,
    co: dict[str, Tensor],
    rule: MemoryRule,
) -> tuple[Tensor, list[Tensor], list[Tensor] | None]:
    """One chunk: gradients at the chunk-start weights, retrieval, end-of-chunk state.

    Tensors are (G, T, ...) and states (G, d_in, d_out); returns y (G, T, Dout) and the state.
    """
    depth = len(xs)
    residual = rule.residual and depth >= 2
    norms = [lq_norm_factor(x, rule) for x in xs] if rule.retention == "lq" else None
    w0 = [x / n for x, n in zip(xs, norms)] if norms else effective_weights(xs, rule)

    # Keys through the MLP at the chunk-start weights, then the analytic backward:
    # layer i's gradient for token j is the outer product zs[i][j] ⊗ deltas[i][j].
    zs, pres, h = [kc], [], kc
    for i, w in enumerate(w0):
        h = torch.bmm(h, w)
        if i < depth - 1:
            pres.append(h)
            h = F.gelu(h)
            zs.append(h)
    if residual:
        h = h + kc
    dlt = output_grad(h - vc, rule, dc)
    deltas = [dlt] * depth
    for i in range(depth - 1, 0, -1):
        dlt = _GeluGradMul.apply(torch.bmm(dlt, w0[i].mT), pres[i - 1])
        deltas[i - 1] = dlt

    # Retrieval: token t reads with its own post-write weights, layer by layer (dual form).
    if rule.retention == "kl":
        s0 = None if ss is None else ss[0]
        a = _kl_retrieve(qc, kc, deltas[0], xs[0], s0, co, rule.simplex_scale)
    else:
        a = qc
        for i in range(depth):
            if i == 0:  # operands built for all chunks up front (see memory_chunked)
                h = torch.bmm(co["q_beta"], xs[0])
                if ss is not None:
                    h = torch.baddbmm(h, co["q_cs"], ss[0])
                h = torch.baddbmm(h, co["att1"], deltas[0], alpha=-1.0)
            else:
                h = co["beta"] * torch.bmm(a, xs[i])
                if ss is not None:
                    h = torch.addcmul(h, co["cs"], torch.bmm(a, ss[i]))
                att = torch.bmm(a, zs[i].mT) * co["C"]
                h = torch.baddbmm(h, att, deltas[i], alpha=-1.0)
            if norms:
                h = h / norms[i]
            a = F.gelu(h) if i < depth - 1 else h
        if residual:
            a = a + qc

    # State after the chunk's last token: X = β X0 + c S0 - Zᵀ diag(C_last) Δ (same for S).
    new_x, new_s = [], None if ss is None else []
    for i in range(depth):
        # Scale whichever side of the outer product is narrower (layer 1: keys, pre-scaled).
        z_w = co["k_wc"] if i == 0 else zs[i]
        d_w = deltas[i] if i == 0 else co["wc_end"] * deltas[i]
        base = co["beta_end"] * xs[i]
        if ss is not None:
            base = torch.addcmul(base, co["cs_end"], ss[i])
            z_h = co["k_hs"] if i == 0 else zs[i]
            d_h = deltas[i] if i == 0 else co["hs_end"] * deltas[i]
            new_s.append(torch.baddbmm(co["ev_end"] * ss[i], z_h.mT, d_h, alpha=-1.0))
        new_x.append(torch.baddbmm(base, z_w.mT, d_w, alpha=-1.0))
    return a, new_x, new_s


def _run_chunks(
    xs: list[Tensor], ss: list[Tensor] | None, chunks: list[tuple], rule: MemoryRule
) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
    """Walk consecutive chunks in order (the unit a checkpoint recomputes)."""
    ys = []
    for qc, kc, vc, dc, co in chunks:
        y, xs, ss = _chunk_step(xs, ss, qc, kc, vc, dc, co, rule)
        ys.append(y)
    return ys, xs, ss


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

    q, k (B, H, L, Din); v (B, H, L, Dout); theta / alpha / eta / huber_delta (B, H, L);
    eta None = no momentum (Miras). Returns y (B, H, L, Dout) in q's dtype and the final state.
    checkpoint=True recomputes the chunks in backward from ~sqrt(n) saved boundary states
    (about a third more compute; the memory of the loop grows like sqrt(L), not L).
    """
    rule.check(state.weights)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if rule.attn_bias == "huber" and huber_delta is None:
        raise ValueError("attn_bias='huber' needs huber_delta (B, H, L)")
    bsz, heads, length, _ = k.shape
    size, groups = chunk_size, bsz * heads
    num = -(-length // size)
    last = (length - 1) % size
    st = init_state(state.weights, state.momentum, bsz, eta is not None)

    def flat(t: Tensor) -> Tensor:  # (B, H, ...) -> (G, ...)
        return t.float().reshape(groups, *t.shape[2:])

    xs = [flat(x) for x in st.weights]
    ss = None if st.momentum is None else [flat(s) for s in st.momentum]
    # Padded tokens get theta = 0, alpha = 0, eta = 1: they never touch rows <= last.
    qs, ks = _to_chunks(flat(q), num, size, 0.0), _to_chunks(flat(k), num, size, 0.0)
    vs = _to_chunks(flat(v), num, size, 0.0)
    co = _coefficients(
        flat(theta), flat(alpha), None if eta is None else flat(eta), num, size, last
    )
    # Layer 1's update and retrieval operands need no weights: build them for all chunks.
    co["k_wc"] = co["wc_end"] * ks
    if ss is not None:
        co["k_hs"] = co["hs_end"] * ks
    if rule.retention != "kl":
        co["q_beta"] = co["beta"] * qs
        co["att1"] = (qs @ ks.mT) * co["C"]
        if ss is not None:
            co["q_cs"] = co["cs"] * qs
    dn = [None] * num
    if huber_delta is not None:
        dn = _to_chunks(flat(huber_delta), num, size, 1.0).unbind(0)
    per_chunk = [dict(zip(co, vals)) for vals in zip(*(c.unbind(0) for c in co.values()))]

    chunks = list(zip(qs.unbind(0), ks.unbind(0), vs.unbind(0), dn, per_chunk))
    # Checkpointing runs groups of ~sqrt(n) chunks: backward keeps ~sqrt(n) boundary states
    # and recomputes one group at a time, so activation memory grows like sqrt(L).
    use_ckpt = checkpoint and torch.is_grad_enabled()
    group = max(1, round(math.sqrt(num))) if use_ckpt else num
    run = _run_chunks
    if use_ckpt:
        run = partial(torch.utils.checkpoint.checkpoint, _run_chunks, use_reentrant=False)
    ys = []
    for start in range(0, num, group):
        y_group, xs, ss = run(xs, ss, chunks[start : start + group], rule)
        ys.extend(y_group)

    y = torch.cat(ys, dim=1)[:, :length].reshape(bsz, heads, length, -1).to(q.dtype)
    # The state is carried across pieces and checkpoint boundaries: copy it out so it does not
    # keep the per-chunk tensors it was sliced from alive (O(L) memory at 2M tokens).
    unflat = lambda t: t.reshape(bsz, heads, *t.shape[1:]).clone()
    mom = None if ss is None else tuple(unflat(s) for s in ss)
    return y, MemoryState(tuple(unflat(x) for x in xs), mom)
