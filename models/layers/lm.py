"""What every decoder LM here shares: embedding, blocks, final norm, (tied) head, GPT-2 init."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from models.layers.norms import RMSNorm


def build_trunk(model: nn.Module, cfg: Any, block: Callable[[Any], nn.Module]) -> None:
    """Set `embed`, `layers` (one `block(cfg)` per layer), `norm`, `head` on `model`.

    `cfg` needs vocab_size, dim, n_layers, norm_eps, tie_embeddings; `layers` is the
    nn.ModuleList that strategies shard and checkpoint per block.
    """
    model.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
    model.layers = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
    model.norm = RMSNorm(cfg.dim, cfg.norm_eps)
    model.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight


def init_lm_weights(
    model: nn.Module, dim: int, n_layers: int, deep: tuple[str, ...] = ("wo.weight", "w2.weight")
) -> None:
    """N(0, dim^-1/2) for every matrix; residual-branch outputs (`deep`) scaled by
    1/sqrt(2 n_layers), as GPT-2 / nanoGPT do, to keep the residual stream's variance flat."""
    std = dim**-0.5
    for name, p in model.named_parameters():
        if p.dim() == 2:
            s = std / (2 * n_layers) ** 0.5 if name.endswith(deep) else std
            nn.init.normal_(p, 0.0, s)
