"""LightNet (Qin et al. 2024, "You Only Scan Once", docs/models.md, LightNet): additive recurrence.

Legend: B batch, H heads, L tokens, N chunks, C chunk size, K key dim, V value dim, A axes.

Token mixer (after the authors' xmixers `LightNetAttention`; details [unverified]): q = SiLU(x W_q),
raw keys k = x W_k, v = x W_v. The decay is additive: with delta = exp(k) and a_t = sum_{s<=t}
delta_s (per key dim i), the state is s_t = sum_{s<=t} (delta_s / a_t) v_s, i.e. a cumulative
softmax of the keys over time, so lambda_t = a_{t-1} / a_t needs no parameters of its own.
MD-LRPE maps q and the key weights to [x cos(phi), x sin(phi)] with per-dim angles phi(pos), so
q~_t . k~_s = sum_i q_ti w_tsi cos(phi_i(t) - phi_i(s)): relative, and linear in the state
(2K x V per head). Angles come from per-axis positions (`lrpe_angles`), so 2D / ND is a call
away. Output: sigmoid low-rank gate (W_u1: D -> r, W_u2: r -> D), RMSNorm, W_o.

Stability: everything is carried in log space, z_t = log a_t (a running logsumexp, i.e. a running
max plus a bounded sum), and every weight used is exp(k_s - z_t) <= 1 or exp(z_u - z_t) <= 1 for
u <= t: no overflow whatever the key magnitudes. The state is kept normalised (S / a, log a).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.lm import build_trunk, init_lm_weights
from models.layers.mlp import SwiGLU, swiglu_hidden
from models.layers.norms import RMSNorm
from models.outputs import SeqOutput
from models.registry import ModelSpec, register

_EMPTY = -1e30


@dataclass(kw_only=True)
class LightNetConfig:
    vocab_size: int = 258
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    gate_rank: int | None = None  # low-rank output gate width; default n_heads (as xmixers)
    ffn_hidden: int | None = None  # default: SwiGLU 8/3 * dim rounded to 64
    chunk_size: int = 32
    lrpe_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= 1")


@dataclass
class AdditiveState:
    """Normalised state S / a_t (B, H, 2K, V) and z = log a_t (B, H, K), per layer."""

    S: torch.Tensor
    z: torch.Tensor


@dataclass
class LightNetState:
    layers: list[AdditiveState]
    pos: int


def lrpe_angles(positions_LA: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Per-dim LRPE angles (L, head_dim) from per-axis integer positions (L, A).

    The key dims are split into A contiguous groups; group a rotates with axis a at geometric
    frequencies base^(-j / size_a). 1D text: positions (L, 1); an image: (H*W, 2) rows/cols.
    """
    if positions_LA.dim() != 2:
        raise ValueError(f"positions must be (L, axes); got {tuple(positions_LA.shape)}")
    num_axes = positions_LA.shape[1]
    sizes = [head_dim // num_axes + (a < head_dim % num_axes) for a in range(num_axes)]
    parts = []
    for a, size in enumerate(sizes):
        freq = base ** (-torch.arange(size, device=positions_LA.device).float() / max(size, 1))
        parts.append(positions_LA[:, a, None].float() * freq)
    return torch.cat(parts, dim=-1)


def _features(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    """[x cos(ang), x sin(ang)] along the last dim: the LRPE map (an isometry)."""
    return torch.cat([x * ang.cos(), x * ang.sin()], dim=-1)


def additive_attention_reference(q, k, v, ang):
    """O(L^2) oracle in fp64: o_t = sum_{s<=t} sum_i q_ti cos(ang_ti - ang_si) softmax_s(k_si) v_s.

    q, k (B, H, L, K), v (B, H, L, V), ang (L, K). The softmax over s <= t is per key dim i.
    """
    q, k, v, ang = q.double(), k.double(), v.double(), ang.double()
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()  # [t, s]
    logits = k[:, :, None, :, :].expand(-1, -1, L, -1, -1)  # (B, H, t, s, K)
    w = torch.softmax(logits.masked_fill(~causal[..., None], float("-inf")), dim=3)
    rel = torch.cos(ang[:, None, :] - ang[None, :, :])  # (t, s, K)
    A = torch.einsum("bhti,tsi,bhtsi->bhts", q, rel, w)
    return A @ v


def additive_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ang: torch.Tensor,
    state: AdditiveState | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, AdditiveState]:
    """Chunkwise additive recurrence with LRPE; returns (o (B, H, L, V), final state), fp32 inside.

    Intra-chunk weights exp(k_s - z_t) are formed exactly, (B, H, N, C, C, K): C times the size of
    k, the price of a per-dim, data-dependent decay without an overflow-prone factorisation.
    """
    B, H, L, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = max(1, math.ceil(L / C))
    pad = N * C - L
    qf, kf, vf, af = q.float(), k.float(), v.float(), ang.float()
    if pad:  # k = -inf on padding: zero weight, z unchanged, so the final state stays exact
        qf = F.pad(qf, (0, 0, 0, pad))
        kf = F.pad(kf, (0, 0, 0, pad), value=float("-inf"))
        vf = F.pad(vf, (0, 0, 0, pad))
        af = F.pad(af, (0, 0, 0, pad))
    # an empty history is log a = _EMPTY (finite: exp(_EMPTY - z) = 0 with NaN-free gradients)
    z0 = kf.new_full((B, H, 1, K), _EMPTY) if state is None else state.z[:, :, None].float()
    S = kf.new_zeros(B, H, 2 * K, V) if state is None else state.S.float()
    z = torch.logcumsumexp(torch.cat([z0, kf], dim=2), dim=2)  # z[:, :, t + 1] = log a_t
    z_prev = z[:, :, :-1].unflatten(2, (N, C))[:, :, :, :1]  # log a before each chunk
    z = z[:, :, 1:].unflatten(2, (N, C))  # (B, H, N, C, K)
    kc = kf.unflatten(2, (N, C))
    cos, sin = af.cos().unflatten(0, (N, C)), af.sin().unflatten(0, (N, C))  # (N, C, K)
    q_feat = _features(qf, af).unflatten(2, (N, C))  # (B, H, N, C, 2K)

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    logw = kc[:, :, :, None, :, :] - z[:, :, :, :, None, :]  # [.., t, s, i] = k_s - z_t
    w = torch.exp(logw.masked_fill(~causal[:, :, None], float("-inf")))
    qc, qs = q_feat[..., :K], q_feat[..., K:]
    A = torch.einsum("bhntsi,bhnti,nsi->bhnts", w, qc, cos) + torch.einsum(
        "bhntsi,bhnti,nsi->bhnts", w, qs, sin
    )
    o = A @ vf.unflatten(2, (N, C))

    read = torch.exp(z_prev - z).repeat(1, 1, 1, 1, 2)  # decay of the old state to each query
    z_end = z[:, :, :, -1:]  # (B, H, N, 1, K)
    w_end = torch.exp(kc - z_end)  # weight of each chunk token in the chunk-end state
    k_feat = torch.cat([w_end * cos, w_end * sin], dim=-1)  # (B, H, N, C, 2K)
    U = k_feat.transpose(-1, -2) @ vf.unflatten(2, (N, C))  # (B, H, N, 2K, V)
    carry = torch.exp(z_prev - z_end)[:, :, :, 0].repeat(1, 1, 1, 2)  # (B, H, N, 2K)
    inter = []
    for n in range(N):
        inter.append((q_feat[:, :, n] * read[:, :, n]) @ S)
        S = carry[:, :, n, :, None] * S + U[:, :, n]
    o = (o + torch.stack(inter, dim=2)).flatten(2, 3)[:, :, :L]
    return o.to(v.dtype), AdditiveState(S, z_end[:, :, -1, 0])


def additive_attention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ang: torch.Tensor, state: AdditiveState
) -> tuple[torch.Tensor, AdditiveState]:
    """One decoding step, O(1) in the context: q, k (B, H, 1, K), v (B, H, 1, V), ang (1, K)."""
    kf = k.float()[:, :, 0]
    z = torch.logaddexp(state.z.float(), kf)
    keep = torch.exp(state.z.float() - z).repeat(1, 1, 2)  # a_{t-1} / a_t, per feature
    w = torch.exp(kf - z)  # delta_t / a_t
    k_feat = torch.cat([w * ang.cos(), w * ang.sin()], dim=-1)  # (B, H, 2K)
    S = keep[..., None] * state.S.float() + k_feat[..., None] * v.float()[:, :, 0, None, :]
    o = _features(q.float(), ang) @ S
    return o.to(v.dtype), AdditiveState(S, z)


class LightNetAttention(nn.Module):
    def __init__(self, cfg: LightNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        rank = cfg.gate_rank or cfg.n_heads
        self.gate_down = nn.Linear(cfg.dim, rank, bias=False)
        self.gate_up = nn.Linear(rank, cfg.dim, bias=False)
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BLD: torch.Tensor, pos0: int, state: AdditiveState | None):
        b, L, _ = x_BLD.shape
        heads = lambda t: t.view(b, L, self.n_heads, self.head_dim).transpose(1, 2)
        q, k, v = heads(F.silu(self.wq(x_BLD))), heads(self.wk(x_BLD)), heads(self.wv(x_BLD))
        pos = torch.arange(pos0, pos0 + L, device=x_BLD.device)[:, None]
        ang = lrpe_angles(pos, self.head_dim, self.cfg.lrpe_base)
        if L == 1 and state is not None:
            o, new = additive_attention_step(q, k, v, ang, state)
        else:
            o, new = additive_attention_chunked(q, k, v, ang, state, self.cfg.chunk_size)
        o = o.transpose(1, 2).reshape(b, L, -1)
        o = o * torch.sigmoid(self.gate_up(self.gate_down(x_BLD)))
        return self.wo(self.out_norm(o)), new


class LightNetBlock(nn.Module):
    def __init__(self, cfg: LightNetConfig) -> None:
        super().__init__()
        self.mix_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mix = LightNetAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden or swiglu_hidden(cfg.dim))

    def forward(self, x, pos0: int, state=None):
        h, new = self.mix(self.mix_norm(x), pos0, state)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), new


class LightNet(nn.Module):
    """`model(tokens (B, L), state=None) -> SeqOutput(logits (B, L, V), state=LightNetState)`."""

    def __init__(self, cfg: LightNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stream_multiple = 1  # log-space state: any split continues exactly
        build_trunk(self, cfg, LightNetBlock)
        init_lm_weights(self, cfg.dim, cfg.n_layers)

    def forward(self, tokens: torch.Tensor, state: LightNetState | None = None) -> SeqOutput:
        pos0 = state.pos if state is not None else 0
        x = self.embed(tokens)
        keep = state is not None or not self.training
        new_states = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, pos0, state.layers[i] if state is not None else None)
            if keep:
                new_states.append(s)
        logits = self.head(self.norm(x))
        return SeqOutput(
            logits, LightNetState(new_states, pos0 + tokens.shape[1]) if keep else None
        )

    def flops_per_token(self, seq_len: int) -> float:
        """Approximate training FLOPs: 6 * matmul params + the chunk form per head and token
        (C x K exact weights and their two contractions, a C x V mix, 2K x V state read/write)."""
        n = sum(p.numel() for p in self.parameters()) - self.embed.weight.numel()
        c = min(self.cfg.chunk_size, seq_len)
        K = self.cfg.dim // self.cfg.n_heads
        per_head = 4 * c * K + c * K + 2 * (2 * K) * K
        return 6 * n + 6 * self.cfg.n_layers * self.cfg.n_heads * per_head


_SIZES = {
    "lightnet-tiny": lambda: LightNetConfig(dim=64, n_layers=2, n_heads=4, chunk_size=16),
    # [unverified] sizing: the repo's 340M LM rung (d 1024, 24 layers, 32K vocab, untied, SwiGLU
    # 2368 as transformer-340m), so LightNet compares with the Titans / Miras baselines.
    "lightnet-340m": lambda: LightNetConfig(
        vocab_size=32000, dim=1024, n_layers=24, n_heads=8, ffn_hidden=2368
    ),
}

LIGHTNET_PAPER = 'Qin et al. 2024, "You Only Scan Once" (LightNet), arXiv:2405.21022'

for _name, _fn in _SIZES.items():
    register(
        ModelSpec(
            name=_name, family="lightnet", config_fn=_fn, builder=LightNet, paper=LIGHTNET_PAPER
        )
    )

NOMINAL_PARAMS = {"lightnet-340m": 340e6}
