"""Aaren (Feng et al. 2024, "Attention as an RNN", docs/models.md, Aaren) stacked as an LM.

Legend: B batch, L tokens, D model width, H heads, Dh head dim.

An Aaren module is softmax attention of ONE learned, input-independent query per head over the
keys / values of the prefix: o_t = sum_{i<=t} softmax_i(q . k_i / sqrt(Dh)) v_i. That is a
many-to-many RNN with state (m, u, w) = (running max score, sum exp(s - m), sum exp(s - m) v)
per head, so training runs the parallel prefix scan `aaren_scan` (O(log L) depth) and decoding
the O(1)-memory update `aaren_step`. Blocks are pre-norm residual like a Transformer:
x += W_o Aaren(norm(x)); x += FFN(norm(x)). Aaren has no positional encoding: order enters
only through the causal prefix, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.lm import build_trunk, init_lm_weights
from models.layers.norms import RMSNorm
from models.ops.scan import AarenState, aaren_scan, aaren_step
from models.outputs import SeqOutput
from models.registry import ModelSpec, register


@dataclass(kw_only=True)
class AarenConfig:
    vocab_size: int = 258
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int | None = None  # default 4 * dim (GELU), a Transformer block's FFN
    norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")


@dataclass
class AarenLMState:
    """Per-layer AarenState: m (B, H), u (B, H), w (B, H, Dh); O(1) in the context length."""

    layers: list[AarenState]
    pos: int


class AarenModule(nn.Module):
    """Learned query token per head; keys and values from the input."""

    def __init__(self, cfg: AarenConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.query = nn.Parameter(torch.randn(cfg.n_heads, self.head_dim))
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BLD: torch.Tensor, state: AarenState | None):
        b, L, _ = x_BLD.shape
        heads = lambda t: t.view(b, L, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = heads(self.wk(x_BLD)), heads(self.wv(x_BLD))
        s = torch.einsum("bhld,hd->bhl", k, self.query.to(k.dtype)) * self.head_dim**-0.5
        if L == 1 and state is not None:  # decoding: one O(1) RNN update
            o, new = aaren_step(state, s[..., 0], v[:, :, 0])
            o = o[:, :, None]
        else:
            o, new = aaren_scan(s, v, state)
        return self.wo(o.transpose(1, 2).reshape(b, L, -1)), new


class AarenBlock(nn.Module):
    def __init__(self, cfg: AarenConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden or 4 * cfg.dim
        self.mix_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mix = AarenModule(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x, state=None):
        h, new = self.mix(self.mix_norm(x), state)
        x = x + h
        return x + self.w2(F.gelu(self.w1(self.ffn_norm(x)))), new


class AarenLM(nn.Module):
    """`model(tokens (B, L), state=None) -> SeqOutput(logits (B, L, V), state=AarenLMState)`."""

    def __init__(self, cfg: AarenConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stream_multiple = 1  # the (m, u, w) summary continues exactly from any split
        build_trunk(self, cfg, AarenBlock)
        init_lm_weights(self, cfg.dim, cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("query"):
                nn.init.normal_(p, 0.0, 1.0)  # scores q.k / sqrt(Dh) start at unit scale

    def forward(self, tokens: torch.Tensor, state: AarenLMState | None = None) -> SeqOutput:
        pos0 = state.pos if state is not None else 0
        x = self.embed(tokens)
        keep = state is not None or not self.training
        new_states = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, state.layers[i] if state is not None else None)
            if keep:
                new_states.append(s)
        logits = self.head(self.norm(x))
        return SeqOutput(logits, AarenLMState(new_states, pos0 + tokens.shape[1]) if keep else None)

    def flops_per_token(self, seq_len: int) -> float:
        """6 * matmul params + the scan: ~log2(L) combine levels of O(Dh) work per head."""
        n = sum(p.numel() for p in self.parameters()) - self.embed.weight.numel()
        levels = max(1, (seq_len - 1).bit_length())
        return 6 * n + 6 * self.cfg.n_layers * self.cfg.dim * (2 + 3 * levels)


_SIZES = {
    "aaren-tiny": lambda: AarenConfig(dim=64, n_layers=2, n_heads=4),
    # [unverified] a small paper-style size: the paper reuses each benchmark's Transformer
    # settings (no single LM config); d 512, 6 layers, 8 heads, 4d FFN, byte vocab.
    "aaren-small": lambda: AarenConfig(dim=512, n_layers=6, n_heads=8),
}

AAREN_PAPER = 'Feng et al. 2024, "Attention as an RNN", arXiv:2405.13956'

for _name, _fn in _SIZES.items():
    register(
        ModelSpec(name=_name, family="aaren", config_fn=_fn, builder=AarenLM, paper=AAREN_PAPER)
    )

NOMINAL_PARAMS = {"aaren-small": 17.4e6}
