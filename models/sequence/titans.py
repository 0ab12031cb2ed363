"""Titans (MODELS.md §1) and its Miras variants (§2): the NeuralMemory layer, then the models.

Legend: B batch, L length, C model width (`dim`), H heads, D head width, K conv kernel.

`NeuralMemory` is the long-term memory block of Titans §4.4: SiLU'd q/k/v projections, each
followed by a short causal depthwise conv, l2-normalised q and k, data-dependent per-token gates
(step theta, momentum eta, forget alpha), a per-head MLP memory written token by token with the
chunked op of `models.ops.memory`, then an output RMSNorm, a SiLU output gate and a projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.norms import RMSNorm
from models.ops.memory import MemoryRule, MemoryState, neural_memory
from models.ops.memory import retrieve as memory_retrieve


@dataclass
class NeuralMemoryState:
    """What a NeuralMemory carries between pieces of a sequence.

    memory: per-layer memory weights / accumulators and momentum, (B, H, d_in, d_out) each.
    conv: the last K-1 projected q|k|v inputs of the causal conv, (B, 3 H D, K-1).
    """

    memory: MemoryState
    conv: Tensor

    def detach(self) -> NeuralMemoryState:
        """Cut the graph between pieces (truncated BPTT)."""
        return NeuralMemoryState(self.memory.detach(), self.conv.detach())


class NeuralMemory(nn.Module):
    """Titans long-term memory layer: y, state = mem(x, state) with x, y (B, L, dim).

    Feeding a sequence in pieces whose lengths are multiples of `chunk_size`, each with the
    previous piece's state, gives the same y as feeding it whole (chunk boundaries line up).
    attn_bias / retention pick the Miras variant (Moneta: lp + lq, Yaad: huber, Memora: kl
    with depth 1; momentum=False for those, as in Miras). impl='reference' runs the token loop
    (tests); checkpoint=True trades ~1/3 more compute for activation memory ~sqrt(L).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        chunk_size: int,
        depth: int = 2,
        expansion: int = 4,
        attn_bias: str = "l2",
        retention: str = "l2",
        momentum: bool = True,
        head_dim: int | None = None,
        conv_kernel: int = 4,
        max_lr: float = 0.1,
        impl: str = "chunked",
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if head_dim is None and dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}; pass head_dim")
        head_dim = head_dim or dim // heads
        if checkpoint and impl != "chunked":
            raise ValueError("checkpoint=True needs impl='chunked'")
        if depth < 1 or chunk_size < 1 or conv_kernel < 1:
            raise ValueError("depth, chunk_size and conv_kernel must be >= 1")
        self.heads, self.head_dim, self.chunk_size = heads, head_dim, chunk_size
        self.max_lr, self.impl, self.kernel = max_lr, impl, conv_kernel
        # Recompute memory chunks in backward: activation memory grows like sqrt(L), not L.
        self.checkpoint = checkpoint
        self.rule = MemoryRule(attn_bias=attn_bias, retention=retention)
        self.use_momentum = momentum
        inner = heads * head_dim

        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        # One depthwise conv over the concatenated q|k|v channels == three separate convs.
        self.conv_weight = nn.Parameter(torch.empty(3 * inner, 1, conv_kernel))
        self.conv_bias = nn.Parameter(torch.zeros(3 * inner))
        nn.init.kaiming_uniform_(self.conv_weight, a=5**0.5)
        # theta, eta, alpha (and Huber's delta) per head and token.
        self.num_gates = 4 if attn_bias == "huber" else 3
        self.gates = nn.Linear(dim, self.num_gates * heads)
        self.out_norm = RMSNorm(head_dim)
        self.out_gate = nn.Linear(dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim, bias=False)

        dims = [head_dim] if depth == 1 else [head_dim] + [expansion * head_dim] * (depth - 1)
        dims.append(head_dim)
        self.memory_init = nn.ParameterList(
            [nn.Parameter(torch.empty(heads, a, b)) for a, b in zip(dims[:-1], dims[1:])]
        )
        self.rule.check(list(self.memory_init))
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Initial memory: fan-in scaled MLP (log-weights 0 = uniform for kl); gates biased so
        the memory starts with a moderate step and a slow forget."""
        for w in self.memory_init:
            if self.rule.retention == "kl":
                nn.init.zeros_(w)
            else:
                nn.init.normal_(w, std=w.shape[-2] ** -0.5)
        with torch.no_grad():
            nn.init.normal_(self.gates.weight, std=0.02)
            bias = self.gates.bias.view(self.num_gates, self.heads)
            bias[0].fill_(0.0)  # theta = max_lr / 2
            bias[1].fill_(2.0)  # eta ~ 0.88
            # alpha ~ 0.018; lq's W = A / ||A||_q^(q-2) grows as A decays, so it forgets slower.
            bias[2].fill_(-7.0 if self.rule.retention == "lq" else -4.0)
            if self.num_gates == 4:
                bias[3].fill_(1.0)  # delta = softplus(1) ~ 1.3

    def initial_state(self, batch: int) -> NeuralMemoryState:
        """The learnable initial memory (broadcast over the batch) and an empty conv cache."""
        ws = tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in self.memory_init)
        moms = tuple(torch.zeros_like(w) for w in ws) if self.use_momentum else None
        channels = self.conv_weight.shape[0]
        conv = self.conv_weight.new_zeros(batch, channels, self.kernel - 1)
        return NeuralMemoryState(MemoryState(ws, moms), conv)

    def _conv(
        self, u_BLC: Tensor, cache: Tensor, weight: Tensor, bias: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv of u with `cache` (B, C, K-1) as left context.

        Returns the output (B, L, C) and the next cache: the last K-1 inputs seen.
        """
        full = torch.cat([cache.to(u_BLC.dtype), u_BLC.mT], dim=-1)
        out = F.conv1d(full, weight, bias, groups=weight.shape[0]).mT
        return out, full[..., full.shape[-1] - (self.kernel - 1) :]

    def _split_heads(self, t_BLX: Tensor) -> Tensor:
        b, length, _ = t_BLX.shape
        return t_BLX.view(b, length, self.heads, -1).transpose(1, 2)

    def _output(self, x_BLC: Tensor, y_BHLD: Tensor) -> Tensor:
        """Per-head RMSNorm, SiLU gate from the input, merge heads, project back to dim."""
        b, _, length, _ = y_BHLD.shape
        y = self.out_norm(y_BHLD.transpose(1, 2)).reshape(b, length, -1)
        return self.out_proj(y.to(x_BLC.dtype) * F.silu(self.out_gate(x_BLC)))

    def forward(
        self, x_BLC: Tensor, state: NeuralMemoryState | None = None
    ) -> tuple[Tensor, NeuralMemoryState]:
        b, length, _ = x_BLC.shape
        if state is None:
            state = self.initial_state(b)
        u, conv_cache = self._conv(self.qkv(x_BLC), state.conv, self.conv_weight, self.conv_bias)
        u = F.silu(u)
        q, k, v = (self._split_heads(t) for t in u.chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)

        g = self.gates(x_BLC).float().view(b, length, self.num_gates, self.heads)
        g = g.permute(2, 0, 3, 1)  # (gate, B, H, L)
        theta = self.max_lr * torch.sigmoid(g[0])
        eta = torch.sigmoid(g[1]) if self.use_momentum else None
        alpha = torch.sigmoid(g[2])
        delta = F.softplus(g[3]) if self.num_gates == 4 else None

        y, mem = neural_memory(
            q,
            k,
            v,
            theta,
            alpha,
            eta,
            state.memory,
            self.chunk_size,
            self.rule,
            huber_delta=delta,
            impl=self.impl,
            **({"checkpoint": True} if self.checkpoint else {}),
        )
        return self._output(x_BLC, y), NeuralMemoryState(mem, conv_cache)

    def retrieve(self, x_or_q: Tensor, state: NeuralMemoryState | None = None) -> Tensor:
        """Read the memory without writing (MAC reads the state before a segment).

        x (B, L, dim) -> (B, L, dim) through the query path and the output block; the query
        conv starts from zeros because the state's conv cache belongs to the written stream.
        q (B, H, L, D), already projected -> the raw memory read M(q), (B, H, L, D).
        """
        batch = x_or_q.shape[0]
        memory = (state or self.initial_state(batch)).memory
        if x_or_q.dim() == 4:
            return memory_retrieve(memory, x_or_q, self.rule)
        inner = self.heads * self.head_dim
        u = F.linear(x_or_q, self.qkv.weight[:inner])
        zeros = u.new_zeros(batch, inner, self.kernel - 1)
        q = F.silu(self._conv(u, zeros, self.conv_weight[:inner], self.conv_bias[:inner])[0])
        q = F.normalize(self._split_heads(q), dim=-1)
        return self._output(x_or_q, memory_retrieve(memory, q.float(), self.rule))
