"""Decoder-only Transformer++ baseline: RMSNorm, rotary, SwiGLU, attention via the dispatcher.

The reference point every memory model is compared with (Titans' and Miras' "Transformer++").
State = the KV cache, so feeding a sequence in pieces with `out.state` equals feeding it whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers.attention import attention
from models.layers.lm import build_trunk, init_lm_weights
from models.layers.mlp import SwiGLU, swiglu_hidden
from models.layers.norms import RMSNorm
from models.layers.rotary import apply_rope, rope_angles
from models.outputs import SeqOutput
from models.registry import ModelSpec, register


@dataclass(kw_only=True)
class TransformerConfig:
    vocab_size: int = 258  # byte tokenizer + 2 specials
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None  # default: SwiGLU 8/3 * dim rounded to 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    window: int | None = None  # sliding-window attention (None = full causal)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={kv}")


@dataclass
class KVState:
    """Per-layer (k, v) caches (B, Hkv, L, D) and the number of positions already seen."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    pos: int


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.window = cfg.window
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x_BLD, cos, sin, cache):
        b, L, _ = x_BLD.shape
        q = self.wq(x_BLD).view(b, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BLD).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x_BLD).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        o = attention(q, k, v, causal=True, window=self.window)
        new_cache = (k, v)
        if self.window is not None:  # only the last `window - 1` keys can be seen again
            new_cache = (k[:, :, -(self.window - 1) :], v[:, :, -(self.window - 1) :])
        return self.wo(o.transpose(1, 2).reshape(b, L, -1)), new_cache


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden or swiglu_hidden(cfg.dim))

    def forward(self, x, cos, sin, cache=None):
        h, new_cache = self.attn(self.attn_norm(x), cos, sin, cache)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), new_cache


class Transformer(nn.Module):
    """`model(tokens (B, L), state=None) -> SeqOutput(logits (B, L, V), state=KVState)`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        build_trunk(self, cfg, Block)
        init_lm_weights(self, cfg.dim, cfg.n_layers)

    def forward(self, tokens: torch.Tensor, state: KVState | None = None) -> SeqOutput:
        L = tokens.shape[1]
        pos0 = state.pos if state is not None else 0
        positions = torch.arange(pos0, pos0 + L, device=tokens.device)
        cos, sin = rope_angles(positions, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta)
        x = self.embed(tokens)
        keep = state is not None or not self.training
        caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cos, sin, state.kv[i] if state is not None else None)
            if keep:
                caches.append(c)
        logits = self.head(self.norm(x))
        return SeqOutput(logits, KVState(caches, pos0 + L) if keep else None)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params + causal attention (PaLM appendix B)."""
        n = sum(p.numel() for p in self.parameters()) - self.embed.weight.numel()
        ctx = min(seq_len, self.cfg.window or seq_len)
        return 6 * n + 6 * self.cfg.n_layers * self.cfg.dim * ctx


def _cfg(**kw) -> TransformerConfig:
    return TransformerConfig(**kw)


_SIZES = {
    # Tests and smoke runs (byte vocab).
    "transformer-tiny": lambda: _cfg(dim=64, n_layers=2, n_heads=4),
    "transformer-small": lambda: _cfg(dim=256, n_layers=4, n_heads=4),
    # Transformer++ sizes of the Titans / Miras tables (Llama-2 32K vocab, untied head).
    "transformer-170m": lambda: _cfg(
        vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_hidden=3328, tie_embeddings=False
    ),
    "transformer-340m": lambda: _cfg(
        vocab_size=32000, dim=1024, n_layers=24, n_heads=16, ffn_hidden=2368, tie_embeddings=False
    ),
    "transformer-760m": lambda: _cfg(
        vocab_size=32000, dim=1536, n_layers=24, n_heads=16, ffn_hidden=3904, tie_embeddings=False
    ),
}

TRANSFORMER_PAPER = 'Touvron et al. 2023, "LLaMA" (Transformer++), arXiv:2302.13971'

for _name, _fn in _SIZES.items():
    register(
        ModelSpec(
            name=_name,
            family="transformer",
            config_fn=_fn,
            builder=Transformer,
            paper=TRANSFORMER_PAPER,
        )
    )

# Nominal sizes (parameters) the presets are checked against in tests (within 2%).
NOMINAL_PARAMS = {"transformer-170m": 170e6, "transformer-340m": 340e6, "transformer-760m": 760e6}
