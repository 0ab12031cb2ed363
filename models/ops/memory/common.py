"""Neural-memory op, the pieces its implementations share: the rule, the state, the memory's
forward and read (`retrieve`), the surrogate output gradients, the retention maps f(X)
(definitions in reference.py's docstring) and the fast paths' gate bounds. Why a module of
its own: the fast paths (chunked.py, triton.py) and the models import these, never the oracle
reference.py, so the oracle's recurrence stays independent.
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
# The fast paths' bounds on the gates before their logs (chunked.py, triton.py; the same in
# both, so they agree at alpha = 1, eta = 0): alpha == 1 or eta == 0 would give log(0) = -inf
# whose gradient is NaN; these bounds change the gates by less than fp32 resolution (alpha) or
# leave a 1e-30 momentum carry (eta). The reference takes no logs, so it needs none.
ALPHA_MAX = 1.0 - 2.0**-24
ETA_MIN = 1e-30


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
    norm: bool = False  # depth >= 2 only: M(x) = [x +] LN(MLP(x)) (the Miras presets set it)
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


def channelwise_gates(theta: Tensor, alpha: Tensor, eta: Tensor | None, k: Tensor) -> bool:
    """Whether theta / alpha are channel-wise, (B, H, L, Din), rather than one value per head
    and token, (B, H, L); checks the shapes (reference.py's docstring, "Gates").

    Both or neither: a per-channel step with a per-head decay (or the reverse) has no use that
    the shared layout does not cover. Channel-wise gates take no momentum (eta must be None):
    Miras has none, and with a per-channel decay the momentum's carry would need a per-channel
    mix of the two state blocks that the chunked form does not build.
    """
    lead = tuple(k.shape[:3])
    shapes = {tuple(theta.shape), tuple(alpha.shape)}
    if shapes == {lead}:
        return False
    if shapes == {(*lead, k.shape[-1])}:
        if eta is not None:
            raise ValueError("channel-wise gates (theta, alpha (B, H, L, Din)) need eta=None")
        return True
    raise ValueError(
        f"theta and alpha must both be (B, H, L) = {lead} or both (B, H, L, Din) = "
        f"{(*lead, k.shape[-1])}; got {tuple(theta.shape)} and {tuple(alpha.shape)}"
    )


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
    # Cast first, as the op's init_state does: the lq norm / kl softmax then run in the compute
    # dtype (bf16 FSDP weights gave MAC's read and the op different maps).
    ws = effective_weights([w.to(cd) for w in state.weights], rule)
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
