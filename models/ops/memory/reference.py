"""Neural-memory op, token-by-token reference: the oracle `chunked.py` must match.

Legend: B batch, H heads, L length, T tokens of one chunk (chunk size b), Din / Dout the
memory's input / output width, N the hidden width of an MLP memory; a weight of layer l is
stored as (B, H, d_{l-1}, d_l) and applied as `x @ W` (row vectors).

Public API: `memory_reference` (this file) and `memory_chunked` (chunked.py) share one
signature (q, k, v, theta, alpha, eta, state, chunk_size, rule, huber_delta) -> (y, state);
`retrieve(state, q, rule)` reads without writing; `MemoryState(weights, momentum)` holds
per-layer tensors; `MemoryRule` holds the Miras choices.

Semantics (Titans, Behrouz et al. 2024, eqs. 12-15 and §3.2; Miras, Behrouz et al. 2025).
Per (batch, head) the memory is an MLP M(x) = W x (depth 1) or, at depth >= 2 (σ = exact GELU),

    M(x) = x + LN(W_L σ(... σ(W_1 x)))      (`rule.norm`, `rule.residual`; each optional)

LN is a LayerNorm over the output features without affine parameters (eps `rule.norm_eps`):
Miras writes the MLP memory as M(x) = x + LN(W_1 σ(W_2 x)), and titans-pytorch wraps its
`MemoryMLP` the same way (`ResidualNorm`: LayerNorm(MLP(x)) + x; its LayerNorm's learnable
gain is itself a memory weight there, here the layer's output RMSNorm carries the gain). The
op's own default is norm=False (the plain MLP, the form the Triton kernels cover). Each model
follows its paper: the Titans models keep the plain MLP (Titans §3.1 uses "simple MLPs with
L_M >= 1 layers"; no norm is mentioned), the Miras presets set `TitansConfig.mem_norm`. The
norm bounds the memory's answer, which keeps the write's error bounded as the weights grow
(without it a depth-2 memory diverged at larger step sizes; TitansConfig.max_lr).

Token t writes with the associative loss ℓ_t = bias(M(k_t) - v_t) and momentum:

    S_t = eta_t S_{t-1} - theta_t ∇ℓ_t            (no momentum: eta is None, S_t = -theta_t ∇ℓ_t)
    X_t = (1 - alpha_t) X_{t-1} + S_t

where X is the memory's accumulator (below). Within a chunk of size b every gradient is taken
at the chunk-start weights W_{t'} (t' = t - t mod b, Titans §3.2). Retrieval y_t = M_t(q_t)
uses the memory AFTER token t has been written (causal). `retrieve(state, q)` is a plain
forward at the state's weights with no update (MAC reads the memory before a segment).

Dtype: the op computes in float64 for float64 q and in float32 for everything else (float32,
and bf16 / fp16, upcast inside; `models.layers.precision.compute_dtype`). y comes back in q's
dtype; the state it returns, and every state it is given, is in the compute dtype (a float32
state passed with float64 q is promoted). float64 end to end is what gradchecks need.

Attentional bias (the output gradient g(r) with r = M(k) - v, ∇ℓ = backprop of g):
  l2     g = 2 r                                          (ℓ = ||r||²)
  lp     g = p tanh(a r) (r² + eps)^((p-1)/2)             (Moneta, p = 3; smooth sign and |.|)
  huber  g = 2 r if ||r||_2 <= delta_t else delta_t tanh(a r)    (Yaad; delta_t per token)
with a = `sign_sharpness`.

Retention: the accumulator X, the chunk-start weights W_{t'} = f(X_{t'}) at which gradients
are taken, and the weights W_t used to retrieve token t inside its chunk:
  l2  X = W.  W_{t'} = X_{t'};  W_t = X_t.  (decay (1 - alpha) = Titans' forget gate)
  lq  X = A (Moneta's un-normalised accumulator, q = 4), per layer
      n(A) = (sum |A|^q + eps)^((q-2)/q) (entrywise over the layer's matrix, i.e.
      ||A||_q^(q-2)); the normalisation runs only at chunk boundaries (Miras):
      W_{t'} = A_{t'} / n(A_{t'});  W_t = A_t / n(A_{t'})  (the chunk-start factor).
      Note: for q = 4 this map has degree -1 in A (W ∝ A / ||A||²), so decay or writes that
      shrink A grow W; keep alpha small. Other reproductions use the same formula; the
      p-norm-algorithm link sign(A)|A|^(q-1) / ||A||_q^(q-2) (degree 1) would differ.
  kl  X = Λ, log-weights (Memora; depth 1 only): each output column lies on the simplex
      scaled by c = `simplex_scale`, W = c softmax(Λ) over the input axis. Λ follows the
      recurrence above, i.e. (1 - λ_t) = (1 - alpha_t) and η'_t = theta_t, with ∇ taken w.r.t.
      W. Exact softmax at chunk start, W_{t'} = c softmax(Λ_{t'}); inside the chunk the
      first-order expansion around it: with P = softmax(Λ_{t'}), D = Λ_t - Λ_{t'},
      W_t = c (P + P ⊙ D - P ⊙ colsum(P ⊙ D)).  At the next chunk start it is exact again.
kl (a softmax over one matrix's inputs) is defined for a linear memory only; lq is applied
layer by layer and works for any depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from models.layers.precision import compute_dtype

ATTN_BIASES = ("l2", "lp", "huber")
RETENTIONS = ("l2", "lq", "kl")


@dataclass(frozen=True, slots=True)
class MemoryRule:
    """The Miras design choices of one memory; the depth comes from the weights passed in."""

    attn_bias: str = "l2"
    retention: str = "l2"
    residual: bool = True  # depth >= 2 only: M(x) = x + MLP(x)
    p: float = 3.0  # lp bias exponent (Moneta)
    q: float = 4.0  # lq retention exponent (Moneta)
    sign_sharpness: float = 10.0  # a in sign(x) ≈ tanh(a x)
    simplex_scale: float = 1.0  # c in W = c softmax(Λ) (Memora)
    eps: float = 1e-6
    norm: bool = False  # depth >= 2 only: M(x) = [x +] LN(MLP(x)) (Miras; models default True)
    norm_eps: float = 1e-5  # the LayerNorm's eps (nn.LayerNorm's default, as in titans-pytorch)

    def __post_init__(self) -> None:
        if self.attn_bias not in ATTN_BIASES:
            raise ValueError(f"attn_bias must be one of {ATTN_BIASES}, got {self.attn_bias!r}")
        if self.retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {RETENTIONS}, got {self.retention!r}")
        if self.p <= 1 or self.q <= 1:
            raise ValueError(f"p and q must be > 1, got p={self.p}, q={self.q}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    def check(self, weights: tuple[Tensor, ...] | list[Tensor]) -> None:
        """Validate layer shapes against the rule (a user error, so ValueError)."""
        depth = len(weights)
        if depth < 1:
            raise ValueError("the memory needs at least one weight matrix")
        if self.retention == "kl" and depth != 1:
            raise ValueError(
                "retention='kl' (Memora) keeps one matrix on the simplex: it needs depth 1, "
                f"got depth {depth}"
            )
        for a, b in zip(weights[:-1], weights[1:]):
            if a.shape[-1] != b.shape[-2]:
                raise ValueError(f"layer widths do not chain: {a.shape} then {b.shape}")
        if depth >= 2 and self.residual and weights[0].shape[-2] != weights[-1].shape[-1]:
            raise ValueError("a residual memory needs equal input and output widths")


DEFAULT_RULE = MemoryRule()  # Titans: l2 bias, l2 retention (frozen, so safe as a default)


class MemoryState(NamedTuple):
    """Per layer (B, H, d_in, d_out): the accumulator X (W, A or Λ) and momentum S (or None)."""

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...] | None = None

    def detach(self) -> MemoryState:
        mom = None if self.momentum is None else tuple(s.detach() for s in self.momentum)
        return MemoryState(tuple(w.detach() for w in self.weights), mom)


def lq_norm_factor(a: Tensor, rule: MemoryRule) -> Tensor:
    """n(A) = ||A||_q^(q-2) per (batch, head) matrix, smoothed by eps; shape (..., 1, 1)."""
    s = a.abs().pow(rule.q).sum(dim=(-2, -1), keepdim=True)
    return (s + rule.eps).pow((rule.q - 2.0) / rule.q)


def effective_weights(xs: tuple[Tensor, ...] | list[Tensor], rule: MemoryRule) -> list[Tensor]:
    """Weights the MLP runs with, from the accumulators (see the module docstring)."""
    if rule.retention == "l2":
        return list(xs)
    if rule.retention == "lq":
        return [x / lq_norm_factor(x, rule) for x in xs]
    return [rule.simplex_scale * torch.softmax(x, dim=-2) for x in xs]


def layer_norm(o: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """LN over the last dim without affine parameters: (n, rstd), n = (o - mean) rstd."""
    c = o - o.mean(-1, keepdim=True)
    rstd = torch.rsqrt(c.square().mean(-1, keepdim=True) + eps)
    return c * rstd, rstd


def mlp_forward(ws: list[Tensor] | tuple[Tensor, ...], x: Tensor, rule: MemoryRule) -> Tensor:
    """M(x) for x (B, H, T, Din) and weights (B, H, d_in, d_out) (or broadcastable)."""
    h = x
    for i, w in enumerate(ws):
        if i > 0:
            h = F.gelu(h)
        h = h @ w
    if len(ws) >= 2:
        if rule.norm:
            h = layer_norm(h, rule.norm_eps)[0]
        if rule.residual:
            h = h + x
    return h


def output_grad(r: Tensor, rule: MemoryRule, delta: Tensor | None = None) -> Tensor:
    """g(r) = d bias / d M(k) for residuals r (..., T, Dout); delta (..., T) for huber."""
    if rule.attn_bias == "l2":
        return 2.0 * r
    sign = torch.tanh(rule.sign_sharpness * r)
    if rule.attn_bias == "lp":
        return rule.p * sign * (r * r + rule.eps).pow((rule.p - 1.0) / 2.0)
    if delta is None:
        raise ValueError("attn_bias='huber' needs huber_delta (B, H, L)")
    d = delta.unsqueeze(-1)
    inside = r.norm(dim=-1, keepdim=True) <= d
    return torch.where(inside, 2.0 * r, d * sign)


def retrieve(state: MemoryState, q: Tensor, rule: MemoryRule = DEFAULT_RULE) -> Tensor:
    """y = M(q) at the state's weights, no update; q (B, H, L, Din) -> (B, H, L, Dout) in the
    compute dtype of q (the weights are cast to it)."""
    cd = compute_dtype(q.dtype)
    ws = [w.to(cd) for w in effective_weights(state.weights, rule)]
    return mlp_forward(ws, q.to(cd), rule)


def init_state(
    weights: tuple[Tensor, ...] | list[Tensor],
    momentum: tuple[Tensor, ...] | list[Tensor] | None,
    batch: int,
    use_momentum: bool,
    dtype: torch.dtype = torch.float32,
) -> MemoryState:
    """Broadcast (H, ...) or (B, H, ...) weights to (B, H, ...) in `dtype` (the compute dtype);
    zero momentum if absent."""
    ws = tuple(w.to(dtype).expand(batch, *w.shape[-3:]) for w in weights)
    if not use_momentum:
        return MemoryState(ws, None)
    if momentum is None:
        return MemoryState(ws, tuple(torch.zeros_like(w) for w in ws))
    return MemoryState(ws, tuple(s.to(dtype).expand(batch, *s.shape[-3:]) for s in momentum))


def _token_grads(
    ws: list[Tensor], k_t: Tensor, v_t: Tensor, delta_t: Tensor | None, rule: MemoryRule
) -> tuple[Tensor, ...]:
    """∇_W bias(M(k_t) - v_t) by autograd (independent of chunked.py's hand-written backward).

    With create_graph the result stays differentiable w.r.t. k, v, delta and the weights.
    Under no_grad the weights are detached leaves: a view of a Parameter made under no_grad
    (what `NeuralMemory.initial_state` passes) requires grad but is no node of any graph.
    """
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        wl = [w if outer and w.requires_grad else w.detach().requires_grad_() for w in ws]
        out = mlp_forward(wl, k_t, rule)
        g = output_grad(out - v_t, rule, delta_t)
        return torch.autograd.grad(out, wl, g, create_graph=outer)


def memory_reference(
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
) -> tuple[Tensor, MemoryState]:
    """Token-by-token recurrence (slow; the oracle) in the compute dtype (module docstring).
    Returns y (B, H, L, Dout) in q's dtype and the state.

    q, k (B, H, L, Din); v (B, H, L, Dout); theta / alpha / eta / huber_delta (B, H, L).
    `state.weights` may be (H, ...) (learnable initial weights) or (B, H, ...).
    """
    rule.check(state.weights)
    bsz, _, length, _ = k.shape
    cd = compute_dtype(q.dtype)
    st = init_state(state.weights, state.momentum, bsz, eta is not None, cd)
    xs = list(st.weights)
    ss = None if st.momentum is None else list(st.momentum)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    ys = []
    for t in range(length):
        if t % chunk_size == 0:
            # Chunk start: gradients of the whole chunk are taken at these weights.
            w_start = effective_weights(xs, rule)
            if rule.retention == "lq":
                n_start = [lq_norm_factor(x, rule) for x in xs]
            if rule.retention == "kl":
                p_start, x_start = torch.softmax(xs[0], dim=-2), xs[0]
        d_t = None if huber_delta is None else huber_delta[:, :, t : t + 1].to(cd)
        grads = _token_grads(w_start, kf[:, :, t : t + 1], vf[:, :, t : t + 1], d_t, rule)
        qt = qf[:, :, t : t + 1]
        th = theta[:, :, t, None, None].to(cd)
        keep = 1.0 - alpha[:, :, t, None, None].to(cd)
        for i, gi in enumerate(grads):
            if ss is not None:
                ss[i] = eta[:, :, t, None, None].to(cd) * ss[i] - th * gi
                xs[i] = keep * xs[i] + ss[i]
            else:
                xs[i] = keep * xs[i] - th * gi
        if rule.retention == "l2":
            w_t = xs
        elif rule.retention == "lq":
            w_t = [x / n for x, n in zip(xs, n_start)]
        else:
            pd = p_start * (xs[0] - x_start)
            w_t = [rule.simplex_scale * (p_start + pd - p_start * pd.sum(dim=-2, keepdim=True))]
        ys.append(mlp_forward(w_t, qt, rule))
    y = torch.cat(ys, dim=2).to(q.dtype)
    return y, MemoryState(tuple(xs), None if ss is None else tuple(ss))
