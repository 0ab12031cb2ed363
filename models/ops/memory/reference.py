"""Neural-memory op, token-by-token reference: the oracle `chunked.py` must match.

Legend: B batch, H heads, L length, T tokens of one chunk (chunk size b), Din / Dout the
memory's input / output width, N the hidden width of an MLP memory; a weight of layer l is
stored as (B, H, d_{l-1}, d_l) and applied as `x @ W` (row vectors).

Public API: `memory_reference` (this file) and `memory_chunked` (chunked.py) share one
signature (q, k, v, theta, alpha, eta, state, chunk_size, rule, huber_delta) -> (y, state);
`retrieve(state, q, rule)` reads without writing; `MemoryState(weights, momentum)` holds
per-layer tensors; `MemoryRule` holds the Miras choices. Those, and the pieces every
implementation shares (the MLP, the surrogates, f(X)), live in common.py: the fast paths
import it, never this file.

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

Gates (channel-wise or per head). theta and alpha are either one value per head and token,
(B, H, L) (Titans: "data-dependent" scalars), or channel-wise, (B, H, L, Din): one value per
input channel of the key. What Miras (§5, "channel-wise parameters", from low-rank projections
of rank 32 / 64) says is only that the gates are channel-wise; which axis of the memory they
scale is not spelled out. Ours: the write's step and decay scale the ROWS of the first layer
(its input axis, whose index is the key's channel), a diagonal per-channel learning rate and
forget gate, as GLA's per-key-channel decay of a (Dk, Dv) state:

    X1_t = (1 - alpha_t) ⊙_rows X1_{t-1} - theta_t ⊙_rows ∇_{W1} ℓ_t     (⊙_rows: row r by [r])

A deeper layer's rows are hidden units, which follow no key channel; they take the head's
channel means, mean_r theta_t[r] and mean_r alpha_t[r] (a scalar per head and token, so every
layer keeps the gates' average step). Why not a gate per hidden row: the gates would then be
(1 + (depth-1) expansion) times wider (5 Din per head at depth 2) for units that have no
meaning across tokens the key's channels do not already give. For a linear memory (Memora) the
write is fully channel-wise. Huber's delta stays one per head (it thresholds the residual's
l2 norm). The chunked form stays exact: the chunk's products of (1 - alpha) become per-channel
cumulative products, A[t, s, r] = β_t[r] / β_s[r], and token i's write to row r is
C[t, i, r] z_i[r] δ_iᵀ (chunked.py). Channel-wise gates take no momentum (eta None; Miras has
none).

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
The last token of a chunk reads the exact map, W_t = f(X_t) (A_t / n(A_t), c softmax(Λ_t)):
"normalised at chunk boundaries" read as the boundary after the chunk's last write, which is
where the next chunk's W_{t'} comes from, so the last token reads the weights the next chunk
writes with. Why this reading: it is causal (X_t holds tokens <= t only; the chunk-end factor
for an earlier token of the chunk would leak later tokens, so those keep the chunk-start
factor), it costs the chunked form nothing (the chunk's end state is computed anyway), and at
chunk size 1 every token is last, so the op is the papers' per-token rule (Moneta: W_t =
A_t / ||A_t||_q^(q-2); Memora: W_t = c softmax(Λ_t)) rather than reading token t with the
factor from before its write. "Last" is by position (t mod b = b - 1), not by where a call
ends: the tokens of a partial final chunk keep the chunk-start factor, so a call's outputs do
not depend on how many tokens follow in it (a prefix gives the whole sequence's outputs, the
models' piece contract); when b divides L, y_{L-1} = retrieve(final state, q_{L-1}).
Memora's "lag token" (Miras §5.4): the chunk's first token takes an exact step,
W_1 = c softmax((1 - λ_1) log W_0 - η'_1 ∇ℓ(W_0)), and the chunk's other tokens take their
gradients at W_1 with a linear approximation in place of the log / softmax. Ours differs in
two ways and is kept: (1) our first token's write already is that exact step (its gradient is
taken at the weights just before it), and Λ stays exact through the chunk (the recurrence is
linear in Λ), so only reads are approximated, not the state the next chunk starts from (a
linear approximation of the update of W itself can leave the simplex, where the next exact
step's log W is undefined); (2) what
the lag token adds, gradients one token fresher for the rest of the chunk, costs a second
dependent write per chunk, and halving the chunk buys more for the same cost. Measured
(float64, B 2, H 2, D 16, L 256, per-token scalar gates, relative error of y / of the
gradients w.r.t. q, k, v, theta, alpha, Λ0, against the exact per-token rule):
                       ours b=4       ours b=16      lag b=4        lag b=16       ours b=2, 8
  memora-tiny init     4.4e-5/7.9e-4  1.4e-4/2.2e-3  3.0e-5/5.8e-4  1.3e-4/2.1e-3  2.2e-5, 8.1e-5
  larger steps         3.3e-2/4.7e-2  1.1e-1/1.1e-1  1.9e-2/3.1e-2  7.8e-2/9.7e-2  1.7e-2, 5.8e-2
(init: Λ0 = 0, theta ~ 0.01, alpha ~ 0.018; larger: Λ0 ~ N(0, 1), theta ~ 0.25, alpha ~ 0.15;
the last column is y only). The lag token at b is 7-41% closer than ours at b; ours at b/2
(the same number of dependent writes) is closer than the lag token at b at b = 4, 8, 16, in y
and in the gradients. Before the last token of a chunk read exactly, ours at b = 4 / 16 was
6.0e-5 / 1.5e-4 (init) and 4.4e-2 / 1.1e-1 (larger steps) in y.
kl (a softmax over one matrix's inputs) is defined for a linear memory only; lq is applied
layer by layer and works for any depth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.layers.precision import compute_dtype
from models.ops.memory.common import (
    DEFAULT_RULE,
    MemoryRule,
    MemoryState,
    channelwise_gates,
    effective_weights,
    init_state,
    lq_norm_factor,
    mlp_forward,
    output_grad,
)

__all__ = ["memory_reference"]


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

    q, k (B, H, L, Din); v (B, H, L, Dout); eta / huber_delta (B, H, L); theta / alpha
    (B, H, L), or (B, H, L, Din) channel-wise (module docstring, "Gates").
    `state.weights` may be (H, ...) (learnable initial weights) or (B, H, ...).
    """
    rule.check(state.weights)
    channelwise = channelwise_gates(theta, alpha, eta, k)
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
        for i, gi in enumerate(grads):
            if not channelwise:
                th = theta[:, :, t, None, None].to(cd)
                keep = 1.0 - alpha[:, :, t, None, None].to(cd)
            elif i == 0:  # row r of the first layer is key channel r
                th = theta[:, :, t, :, None].to(cd)
                keep = 1.0 - alpha[:, :, t, :, None].to(cd)
            else:  # hidden rows: the head's channel means
                th = theta[:, :, t].to(cd).mean(-1)[..., None, None]
                keep = 1.0 - alpha[:, :, t].to(cd).mean(-1)[..., None, None]
            if ss is not None:
                ss[i] = eta[:, :, t, None, None].to(cd) * ss[i] - th * gi
                xs[i] = keep * xs[i] + ss[i]
            else:
                xs[i] = keep * xs[i] - th * gi
        if rule.retention == "l2" or t % chunk_size == chunk_size - 1:
            w_t = effective_weights(xs, rule)  # a chunk's last token reads the exact map
        elif rule.retention == "lq":
            w_t = [x / n for x, n in zip(xs, n_start)]
        else:
            pd = p_start * (xs[0] - x_start)
            w_t = [rule.simplex_scale * (p_start + pd - p_start * pd.sum(dim=-2, keepdim=True))]
        ys.append(mlp_forward(w_t, qt, rule))
    y = torch.cat(ys, dim=2).to(q.dtype)
    return y, MemoryState(tuple(xs), None if ss is None else tuple(ss))
