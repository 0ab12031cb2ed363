"""Titans (Behrouz et al. 2024) and its Miras variants (Behrouz et al. 2025): the NeuralMemory
layer, then the models.

Legend: B batch, L length, C model width (`dim`), H heads, D head width, K conv kernel.

`NeuralMemory` is the long-term memory block of Titans §4.4: SiLU'd q/k/v projections, each
followed by a short causal depthwise conv, l2-normalised q and k, data-dependent per-token gates
(step theta, momentum eta, forget alpha; per head, or per head and key channel from a low-rank
projection with `gate_rank`, the Miras presets), a per-head MLP memory written token by token
with the chunked op of `models.ops.memory`, then an output RMSNorm, a SiLU output gate and a
projection.

The models (§4): LMM, MAC, MAG, MAL around `NeuralMemory`.

Persistent memory: `persistent` learnable tokens per layer are an always-visible prefix of the
layer's attention (input-independent keys / values). The paper prepends them to the input;
through causal layers their states stay input-independent, so a per-layer prefix is the same
family of functions, and it keeps streaming exact (the memory sees only real tokens, its
learnable initial state playing the part of M([P])).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.attention import attention
from models.layers.fused_io import conv_silu_norm, norm_gate
from models.layers.loss import chunked_lm_loss
from models.layers.mlp import SwiGLU, swiglu_hidden
from models.layers.norms import RMSNorm
from models.layers.precision import upcast
from models.layers.rotary import apply_rope, rope_angles
from models.layers.segment_scan import checkpointed_scan
from models.ops.memory import MemoryRule, MemoryState, neural_memory
from models.ops.memory import retrieve as memory_retrieve
from models.outputs import SeqOutput
from models.registry import ModelSpec, register


@dataclass
class NeuralMemoryState:
    """What a NeuralMemory carries between pieces of a sequence.

    memory: per-layer memory weights / accumulators and momentum, (B, H, d_in, d_out) each.
    conv: the last K-1 projected q|k|v inputs of the causal conv, (B, 3 H D, K-1).
    aligned: False after a piece whose length is not a multiple of the chunk size: the memory's
    chunks would not line up with the whole sequence's, so the layer refuses to continue from it.
    """

    memory: MemoryState
    conv: Tensor
    aligned: bool = True

    def detach(self) -> NeuralMemoryState:
        """Cut the graph between pieces (truncated BPTT)."""
        return NeuralMemoryState(self.memory.detach(), self.conv.detach(), self.aligned)

    def tensors(self) -> list[Tensor]:
        """Flat list: weights, momentum (if any), conv cache (for `checkpointed_scan`)."""
        return [*self.memory.weights, *(self.memory.momentum or ()), self.conv]

    @staticmethod
    def from_tensors(ts: list[Tensor], depth: int) -> NeuralMemoryState:
        mom = tuple(ts[depth:-1]) or None
        return NeuralMemoryState(MemoryState(tuple(ts[:depth]), mom), ts[-1])


class NeuralMemory(nn.Module):
    """Titans long-term memory layer: y, state = mem(x, state) with x, y (B, L, dim).

    Feeding a sequence in pieces whose lengths are multiples of `chunk_size`, each with the
    previous piece's state, gives the same y as feeding it whole (chunk boundaries line up); a
    shorter last piece is exact too, but its state cannot be continued (ValueError).
    norm=True (Miras' M(x) = x + LN(MLP(x)), as titans-pytorch's `ResidualNorm`) puts a
    LayerNorm on the MLP memory's answer (depth >= 2); the default is Titans' plain MLP
    (Titans §3.1: "simple MLPs with L_M >= 1 layers"). The Triton kernels do not cover the
    norm, so impl='auto' runs the chunked form for it.
    attn_bias / retention pick the Miras variant (Moneta: lp + lq, Yaad: huber, Memora: kl
    with depth 1; momentum=False for those, as in Miras). impl='reference' runs the token loop
    (tests); checkpoint=True trades ~1/3 more compute for activation memory ~sqrt(L).
    gate_rank=0: Titans' gates, one value per head and token, each from one Linear of x.
    gate_rank=r > 0 (Miras: "channel-wise" gates from low-rank projections, rank 32 / 64):
    x -> Linear(dim, r) -> Linear(r, ...) gives theta and alpha per head and key channel,
    (B, H, L, D), which scale the first memory layer's rows (models/ops/memory/reference.py,
    "Gates"), and Huber's delta per head; no momentum. Like the scalar gates they read the raw
    x: the short conv (kernel `conv_kernel`) is on q / k / v only (Titans §4.4 puts it after
    the q / k / v projections; the Miras text we have says "conv kernel 4" without naming the
    gates). The Triton kernels take scalar gates only: impl='auto' runs the chunked form.
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
        max_lr: float = 0.02,
        impl: str = "chunked",
        checkpoint: bool = False,
        norm: bool = False,
        gate_rank: int = 0,
    ) -> None:
        super().__init__()
        if head_dim is None and dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}; pass head_dim")
        head_dim = head_dim or dim // heads
        if checkpoint and impl != "chunked":
            raise ValueError("checkpoint=True needs impl='chunked'")
        if depth < 1 or chunk_size < 1 or conv_kernel < 1:
            raise ValueError("depth, chunk_size and conv_kernel must be >= 1")
        if gate_rank < 0:
            raise ValueError(f"gate_rank must be >= 0, got {gate_rank}")
        if gate_rank and momentum:
            raise ValueError("gate_rank > 0 (channel-wise gates, Miras) needs momentum=False")
        self.heads, self.head_dim, self.chunk_size = heads, head_dim, chunk_size
        self.max_lr, self.impl, self.kernel = max_lr, impl, conv_kernel
        # Recompute memory chunks in backward: activation memory grows like sqrt(L), not L.
        self.checkpoint = checkpoint
        self.rule = MemoryRule(attn_bias=attn_bias, retention=retention, norm=norm)
        self.use_momentum = momentum
        inner = heads * head_dim

        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        # One depthwise conv over the concatenated q|k|v channels == three separate convs.
        self.conv_weight = nn.Parameter(torch.empty(3 * inner, 1, conv_kernel))
        self.conv_bias = nn.Parameter(torch.zeros(3 * inner))
        nn.init.kaiming_uniform_(self.conv_weight, a=5**0.5)
        self.gate_rank = gate_rank
        if gate_rank == 0:
            # theta, eta, alpha (and Huber's delta) per head and token.
            self.num_gates = 4 if attn_bias == "huber" else 3
            self.gates = nn.Linear(dim, self.num_gates * heads)
        else:
            # theta, alpha per head and key channel (inner each), Huber's delta per head.
            self.num_gates = 0
            self.gate_down = nn.Linear(dim, gate_rank, bias=False)
            self.gates = nn.Linear(gate_rank, 2 * inner + (heads if attn_bias == "huber" else 0))
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
        # alpha ~ 0.018; lq's W = A / ||A||_q^(q-2) grows as A decays, so it forgets slower.
        alpha_bias = -7.0 if self.rule.retention == "lq" else -4.0
        with torch.no_grad():
            if self.gate_rank:
                # the product's pre-activation spread matches the one-Linear gates' (std 0.02)
                dim, rank = self.gate_down.weight.shape[1], self.gate_rank
                nn.init.normal_(self.gate_down.weight, std=dim**-0.5)
                nn.init.normal_(self.gates.weight, std=0.02 * (dim / rank) ** 0.5)
                inner = self.heads * self.head_dim
                self.gates.bias[:inner].fill_(0.0)  # theta = max_lr / 2
                self.gates.bias[inner : 2 * inner].fill_(alpha_bias)
                self.gates.bias[2 * inner :].fill_(1.0)  # delta = softplus(1) ~ 1.3
                return
            nn.init.normal_(self.gates.weight, std=0.02)
            bias = self.gates.bias.view(self.num_gates, self.heads)
            bias[0].fill_(0.0)  # theta = max_lr / 2
            bias[1].fill_(2.0)  # eta ~ 0.88
            bias[2].fill_(alpha_bias)
            if self.num_gates == 4:
                bias[3].fill_(1.0)  # delta = softplus(1) ~ 1.3

    def initial_state(self, batch: int) -> NeuralMemoryState:
        """The learnable initial memory (broadcast over the batch) and an empty conv cache."""
        ws = tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in self.memory_init)
        moms = tuple(torch.zeros_like(w) for w in ws) if self.use_momentum else None
        channels = self.conv_weight.shape[0]
        conv = self.conv_weight.new_zeros(batch, channels, self.kernel - 1)
        return NeuralMemoryState(MemoryState(ws, moms), conv)

    def _conv_input(self, u_BLC: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """[cache | u] (B, K-1+L, C), the causal conv's input with its left context, and the
        next cache (B, C, K-1): the last K-1 inputs seen (a copy, not a view of u)."""
        full = torch.cat([cache.mT.to(u_BLC.dtype), u_BLC], dim=1)
        return full, full[:, u_BLC.shape[1] :].mT.clone()

    def _split_heads(self, t_BLX: Tensor) -> Tensor:
        b, length, _ = t_BLX.shape
        return t_BLX.view(b, length, self.heads, -1).transpose(1, 2)

    def _output(self, x_BLC: Tensor, y_BHLD: Tensor) -> Tensor:
        """Per-head RMSNorm, SiLU gate from the input, merge heads, project back to dim."""
        gated = norm_gate(y_BHLD, self.out_norm.weight, self.out_norm.eps, self.out_gate(x_BLC))
        return self.out_proj(gated.to(x_BLC.dtype))

    # On CPU a long input runs as consecutive pieces of about this many tokens (batch x length),
    # the state carried (same result: pieces are whole chunks). glibc maps every block over
    # 32 MB afresh and unmaps it on free, so length-sized activations ((L, 3 dim) is 100 MB at
    # 32k tokens) page-fault in at every step: at 32k the layer around the memory op took
    # longer than the op itself.
    CPU_PIECE_TOKENS = 4096

    def forward(
        self, x_BLC: Tensor, state: NeuralMemoryState | None = None
    ) -> tuple[Tensor, NeuralMemoryState]:
        b, length, _ = x_BLC.shape
        if state is None:
            state = self.initial_state(b)
        elif not state.aligned:
            raise ValueError(
                f"this state follows a piece whose length was not a multiple of chunk_size="
                f"{self.chunk_size}: continuing from it would not equal the whole sequence (the "
                f"memory's chunks would not line up); feed pieces of multiples of "
                f"{self.chunk_size} tokens (only a sequence's last piece may be shorter); got a "
                f"next piece of {length}"
            )
        piece = self.chunk_size * max(1, self.CPU_PIECE_TOKENS // (b * self.chunk_size))
        if x_BLC.device.type != "cpu" or length <= piece:
            return self._forward(x_BLC, state)
        ys = []
        for x_piece in x_BLC.split(piece, dim=1):
            y, state = self._forward(x_piece, state)
            ys.append(y)
        return torch.cat(ys, dim=1), state

    def _forward(self, x_BLC: Tensor, state: NeuralMemoryState) -> tuple[Tensor, NeuralMemoryState]:
        length = x_BLC.shape[1]
        full, conv_cache = self._conv_input(self.qkv(x_BLC), state.conv)
        inner = self.heads * self.head_dim
        # conv, SiLU, and l2-normalised q and k in one node that keeps only `full`
        u = conv_silu_norm(full, self.conv_weight[:, 0], self.conv_bias, 2 * inner, self.head_dim)
        q, k, v = (self._split_heads(t) for t in u.chunk(3, dim=-1))

        theta, alpha, eta, delta = self._gates(x_BLC)

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
        aligned = length % self.chunk_size == 0
        return self._output(x_BLC, y), NeuralMemoryState(mem, conv_cache, aligned)

    def _gates(self, x_BLC: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """theta, alpha, eta (None without momentum), Huber's delta (None for other biases):
        (B, H, L) each, or theta / alpha (B, H, L, D) with channel-wise gates (gate_rank > 0)."""
        b, length, _ = x_BLC.shape
        if self.gate_rank:
            g = upcast(self.gates(self.gate_down(x_BLC)))
            inner = self.heads * self.head_dim
            th, al = (
                t.view(b, length, self.heads, self.head_dim).transpose(1, 2)
                for t in (g[..., :inner], g[..., inner : 2 * inner])
            )
            delta = F.softplus(g[..., 2 * inner :]).mT if self.rule.attn_bias == "huber" else None
            return self.max_lr * torch.sigmoid(th), torch.sigmoid(al), None, delta
        g = upcast(self.gates(x_BLC)).view(b, length, self.num_gates, self.heads)
        g = g.permute(2, 0, 3, 1)  # (gate, B, H, L)
        theta = self.max_lr * torch.sigmoid(g[0])
        eta = torch.sigmoid(g[1]) if self.use_momentum else None
        alpha = torch.sigmoid(g[2])
        delta = F.softplus(g[3]) if self.num_gates == 4 else None
        return theta, alpha, eta, delta

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
        full = self._conv_input(u, u.new_zeros(batch, inner, self.kernel - 1))[0]
        w, bias = self.conv_weight[:inner, 0], self.conv_bias[:inner]
        q = self._split_heads(conv_silu_norm(full, w, bias, inner, self.head_dim))
        return self._output(x_or_q, memory_retrieve(memory, q, self.rule))


# ---------------------------------------------------------------------------------------------
# Titans models (§4): LMM, MAC, MAG, MAL. Miras models reuse them (models/sequence/miras.py).


# The largest memory step size a depth >= 2 memory without its LayerNorm is allowed
# (TitansConfig.max_lr's comment has the measurements).
MAX_LR_WITHOUT_NORM = 0.02


@dataclass(kw_only=True)
class TitansConfig:
    """One Titans / Miras language model. Persistent tokens enter every attention as an
    always-visible prefix of `persistent` learnable tokens per layer."""

    variant: str = "mac"  # lmm | mac | mag | mal
    vocab_size: int = 258
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4  # attention heads
    mem_heads: int = 4
    mem_depth: int = 2
    mem_expansion: int = 4
    chunk_size: int = 16  # memory chunk b: gradients at chunk-start weights
    segment_len: int = 32  # MAC segment
    window: int = 32  # MAG / MAL sliding window
    persistent: int = 4  # N_p
    ffn_hidden: int | None = None
    attn_bias: str = "l2"
    retention: str = "l2"
    momentum: bool = True
    # M(x) = x + LN(MLP(x)) (Miras; titans-pytorch's ResidualNorm): see models/ops/memory.
    # Off for the Titans models, whose paper's memory is a plain MLP (§3.1); the Miras presets
    # turn it on (their paper's memory). The Triton kernels do not cover it, so with
    # mem_norm=True "auto" runs the chunked form.
    mem_norm: bool = False
    # Memory gates: 0 = Titans' (one theta / eta / alpha per head and token, each from one
    # Linear); r > 0 = Miras' channel-wise theta / alpha per head and key channel from a rank-r
    # projection (NeuralMemory; needs momentum=False). The Miras presets set 32 / 64.
    gate_rank: int = 0
    # Step-size ceiling of the memory. The loss is a sum of squares over D features (not a
    # mean as in titans-pytorch), so 0.02 here is ~1.3 there. Without the norm nothing bounds
    # the MLP's answer: its curvature grows with the weights, and 0.05 made MAC-tiny NaN within
    # 96 tokens (weights ~1e4 after 64), so mem_norm=False at depth >= 2 allows max_lr <= 0.02
    # (MAX_LR_WITHOUT_NORM). With the norm, MAC-tiny stayed finite at 0.02-1.0 over 512 tokens.
    max_lr: float = 0.02
    # Long-context memory savers: checkpoint the memory every `mem_checkpoint` tokens (MAC: per
    # segment) so only the state at those boundaries is kept; cross-entropy in chunks of
    # `loss_chunk` positions (0 = return full logits).
    mem_checkpoint: int = 0
    loss_chunk: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # "auto": the Triton kernels on CUDA where they cover the rule (Titans' l2 / l2, depth 1-2),
    # the chunked PyTorch form otherwise and on CPU (identical there). On an H100 the op ran
    # 156-275k tok/s in Triton against 21-27k chunked (benchmarks/memory_vs_titans_pytorch.py).
    mem_impl: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.max_lr < math.inf:
            raise ValueError(f"max_lr={self.max_lr} must be a finite value > 0")
        if not self.mem_norm and self.mem_depth >= 2 and self.max_lr > MAX_LR_WITHOUT_NORM:
            raise ValueError(
                f"max_lr={self.max_lr} with mem_norm=False and mem_depth={self.mem_depth}: the "
                f"memory diverges (NaN) above this range; allowed (0, {MAX_LR_WITHOUT_NORM}], or "
                "set mem_norm=True (M(x) = x + LN(MLP(x)), stable at larger max_lr)"
            )
        if self.gate_rank < 0 or (self.gate_rank and self.momentum):
            raise ValueError(
                f"gate_rank={self.gate_rank}: must be >= 0, and channel-wise gates (> 0) need "
                f"momentum=False (got momentum={self.momentum})"
            )
        if self.variant not in ("lmm", "mac", "mag", "mal"):
            raise ValueError(f"variant={self.variant!r}; expected lmm, mac, mag or mal")
        if self.dim % self.n_heads or self.dim % self.mem_heads:
            raise ValueError(
                f"dim={self.dim} must be divisible by n_heads={self.n_heads} and "
                f"mem_heads={self.mem_heads}"
            )
        if self.mem_checkpoint % self.chunk_size:
            raise ValueError(
                f"mem_checkpoint={self.mem_checkpoint} must be a multiple of chunk_size="
                f"{self.chunk_size}"
            )
        if self.variant == "mac" and self.segment_len % self.chunk_size:
            raise ValueError(
                f"segment_len={self.segment_len} must be a multiple of chunk_size="
                f"{self.chunk_size} so segments and memory chunks line up"
            )


def _rope(t: Tensor, pos: Tensor, theta: float) -> Tensor:
    cos, sin = rope_angles(pos, t.shape[-1], theta)
    return apply_rope(t, cos, sin)


class PrefixAttention(nn.Module):
    """Softmax attention with `persistent` learnable prefix tokens always visible.

    The prefix tokens go through the same k / v projections (input-independent keys), without
    rotary; the other tokens carry rotary positions.
    """

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.h, self.d = cfg.n_heads, cfg.dim // cfg.n_heads
        self.theta = cfg.rope_theta
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.persistent = nn.Parameter(torch.randn(cfg.persistent, cfg.dim) * 0.02)

    def heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.h, self.d).transpose(1, 2)

    def prefix_kv(self, batch: int) -> tuple[Tensor, Tensor]:
        p = self.persistent.unsqueeze(0).expand(batch, -1, -1)
        return self.heads(self.wk(p)), self.heads(self.wv(p))

    def merge(self, o_BHLD: Tensor) -> Tensor:
        b, _, n, _ = o_BHLD.shape
        return self.wo(o_BHLD.transpose(1, 2).reshape(b, n, -1))


class SlidingWindowAttention(PrefixAttention):
    """MAG / MAL attention: window of `window` positions plus the persistent prefix.
    State: the last window - 1 keys / values, so pieces fed with state equal the whole."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg)
        self.window = cfg.window

    def forward(self, x: Tensor, pos0: int, cache: tuple[Tensor, Tensor] | None):
        b, n, _ = x.shape
        pos = torch.arange(pos0, pos0 + n, device=x.device)
        q = _rope(self.heads(self.wq(x)), pos, self.theta)
        k = _rope(self.heads(self.wk(x)), pos, self.theta)
        v = self.heads(self.wv(x))
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        pk, pv = self.prefix_kv(b)
        o = attention(
            q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), window=self.window, prefix=pk.shape[2]
        )
        keep = self.window - 1
        return self.merge(o), (k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :])


class SegmentAttention(PrefixAttention):
    """MAC attention over [P || h || segment]: h_j (the memory's answer to token j) and
    token j are visible to token i when j <= i; P always. Segment-local rotary positions."""

    def forward(self, x_seg: Tensor, h_seg: Tensor) -> Tensor:
        b, s, _ = x_seg.shape
        pos = torch.arange(s, device=x_seg.device)
        q = _rope(self.heads(self.wq(x_seg)), pos, self.theta)
        kx = _rope(self.heads(self.wk(x_seg)), pos, self.theta)
        kh = _rope(self.heads(self.wk(h_seg)), pos, self.theta)
        vx, vh = self.heads(self.wv(x_seg)), self.heads(self.wv(h_seg))
        pk, pv = self.prefix_kv(b)
        causal = torch.ones(s, s, dtype=torch.bool, device=x_seg.device).tril()
        pre = torch.ones(s, pk.shape[2], dtype=torch.bool, device=x_seg.device)
        mask = torch.cat([pre, causal, causal], dim=1)
        k, v = torch.cat([pk, kh, kx], 2), torch.cat([pv, vh, vx], 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.merge(o)


class MemoryGate(nn.Module):
    """Titans' ⊗: normalise both branches with learnable vector weights, then σ-gate."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm_y = RMSNorm(dim, eps)
        self.norm_m = RMSNorm(dim, eps)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        return self.norm_y(y) * torch.sigmoid(self.norm_m(m))


class TitansBlock(nn.Module):
    """One layer of any variant; `forward(x, state) -> (x, state)`."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.variant = cfg.variant
        self.mem_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.memory = NeuralMemory(
            cfg.dim,
            cfg.mem_heads,
            cfg.chunk_size,
            depth=cfg.mem_depth,
            expansion=cfg.mem_expansion,
            attn_bias=cfg.attn_bias,
            retention=cfg.retention,
            momentum=cfg.momentum,
            max_lr=cfg.max_lr,
            impl=cfg.mem_impl,
            norm=cfg.mem_norm,
            gate_rank=cfg.gate_rank,
        )
        if cfg.variant == "mac":
            self.attn = SegmentAttention(cfg)
            self.gate = MemoryGate(cfg.dim, cfg.norm_eps)
        elif cfg.variant in ("mag", "mal"):
            self.attn = SlidingWindowAttention(cfg)
            self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            if cfg.variant == "mag":
                self.gate = MemoryGate(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden or swiglu_hidden(cfg.dim))

    def forward(self, x: Tensor, st: dict) -> tuple[Tensor, dict]:
        # A new dict: activation checkpointing reruns forward with the same `st` in backward,
        # so writing into it would recompute from the state after the piece.
        st, v = dict(st), self.variant
        if v == "lmm":
            m, st["mem"] = self._memory(self.mem_norm(x), st.get("mem"))
            x = x + m
        elif v == "mal":
            m, st["mem"] = self._memory(self.mem_norm(x), st.get("mem"))
            x = x + m
            a, st["kv"] = self.attn(self.attn_norm(x), st.get("pos", 0), st.get("kv"))
            x = x + a
        elif v == "mag":
            u = self.mem_norm(x)
            a, st["kv"] = self.attn(self.attn_norm(x), st.get("pos", 0), st.get("kv"))
            m, st["mem"] = self._memory(u, st.get("mem"))
            x = x + self.gate(a, m)
        else:
            # MAC is segment-wise end to end: the FFN runs inside each (checkpointed) segment,
            # so a 2M-token block never holds full-length FFN activations.
            x, st["mem"] = self._mac(x, st.get("mem"))
            st["pos"] = st.get("pos", 0) + x.shape[1]
            return x, st
        st["pos"] = st.get("pos", 0) + x.shape[1]
        return x + self.ffn(self.ffn_norm(x)), st

    def _checkpointing(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.cfg.mem_checkpoint > 0

    def _memory(self, u: Tensor, mem: NeuralMemoryState | None):
        """The memory over u, in checkpointed pieces of `mem_checkpoint` tokens when training
        long sequences (pieces with carried state equal the whole: chunk-aligned)."""
        n = self.cfg.mem_checkpoint
        if not self._checkpointing() or u.shape[1] <= n:
            return self.memory(u, mem)
        return self._scan(self.memory, u, mem, n, self.memory)

    def _scan(
        self, fn: Callable, x: Tensor, mem: NeuralMemoryState | None, seg: int, owner: nn.Module
    ):
        """fn(x_j, state) over segments, each recomputed alone in backward (segment_scan.py):
        backward keeps x and one memory state per segment, and no forward graph. `owner`:
        the module whose parameters fn reads."""
        depth = len(self.memory.memory_init)

        def step(x_j: Tensor, ts: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
            y, st = fn(x_j, NeuralMemoryState.from_tensors(ts, depth))
            return y, st.tensors()

        mem = mem or self.memory.initial_state(x.shape[0])
        params = [p for p in owner.parameters() if p.requires_grad]
        y, ts = checkpointed_scan(step, x, mem.tensors(), params, seg)
        out = NeuralMemoryState.from_tensors(ts, depth)
        out.aligned = x.shape[1] % self.cfg.chunk_size == 0
        return y, out

    def _mac_segment(self, x_seg: Tensor, mem: NeuralMemoryState | None):
        u = self.mem_norm(x_seg)
        h = self.memory.retrieve(u, mem)
        y = self.attn(u, h)
        m, mem = self.memory(y, mem)
        x_seg = x_seg + self.gate(y, m)
        return x_seg + self.ffn(self.ffn_norm(x_seg)), mem

    def _mac(self, x: Tensor, mem: NeuralMemoryState | None):
        """Segments in order: read memory (state before the segment), attend over
        [P || read || segment], write the attention output, gate with the memory's answer."""
        seg = self.cfg.segment_len
        if self._checkpointing():
            return self._scan(self._mac_segment, x, mem, seg, self)
        outs = []
        for x_seg in x.split(seg, dim=1):  # split: one backward node, not one per slice
            o, mem = self._mac_segment(x_seg, mem)
            outs.append(o)
        return torch.cat(outs, dim=1), mem


class Titans(nn.Module):
    """`model(tokens (B, L), state=None) -> SeqOutput(logits, state)`; state = per-layer memory
    (+ sliding-window KV cache for MAG / MAL). Pieces must be multiples of `stream_multiple`
    (the memory's chunks and MAC's segments line up with the whole sequence's); a sequence's
    last piece may be shorter, and continuing from its state raises ValueError."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TitansBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.stream_multiple = math.lcm(
            cfg.chunk_size, cfg.segment_len if cfg.variant == "mac" else 1
        )
        std = cfg.dim**-0.5
        nn.init.normal_(self.embed.weight, 0.0, std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, 0.0, std)

    def forward(
        self,
        tokens: Tensor,
        state: list[dict] | None = None,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
    ) -> SeqOutput:
        if state:
            done, mult = state[0].get("pos", 0), self.stream_multiple
            if done % mult:
                raise ValueError(
                    f"this state follows pieces totalling {done} tokens, not a multiple of "
                    f"stream_multiple={mult}: a piece ended {done % mult} tokens past a multiple "
                    f"of {mult}, so continuing would not equal feeding the sequence whole. Feed "
                    f"pieces of multiples of {mult} tokens; only the last piece of a sequence "
                    "may be shorter (its own logits are exact)"
                )
        x = self.embed(tokens)
        # each block copies the dict it is given (TitansBlock.forward), so no copy here
        states = list(state) if state is not None else [{} for _ in self.layers]
        for i, layer in enumerate(self.layers):
            x, states[i] = layer(x, states[i])
        if targets is not None:
            chunk = self.cfg.loss_chunk or x.shape[1]
            loss = chunked_lm_loss(x, self.head.weight, targets, loss_mask, chunk, self.norm)
            return SeqOutput(None, states, loss=loss)
        return SeqOutput(self.head(self.norm(x)), states)

    def flops_per_token(self, seq_len: int) -> float:
        """6 N (matmul params) + attention over the window / segment + the memory's own work
        (forward, analytic gradient and retrieval of each token: ~3x a forward of the MLP)."""
        cfg = self.cfg
        n = sum(p.numel() for p in self.parameters()) - self.embed.weight.numel()
        ctx = {"mac": 2 * cfg.segment_len, "mag": cfg.window, "mal": cfg.window}.get(cfg.variant, 0)
        mem = sum(w.numel() for blk in self.layers for w in blk.memory.memory_init)
        return 6 * n + 6 * cfg.n_layers * cfg.dim * ctx + 6 * 3 * mem


def _titans(variant: str, **kw) -> Callable[[], TitansConfig]:
    return lambda: TitansConfig(variant=variant, **kw)


# Paper sizes (Titans §5: 170M / 340M / 400M / 760M on a Llama-2 32K vocab, untied head). The
# paper gives neither widths nor window / segment / chunk sizes: LMM keeps Transformer++'s
# depth; the hybrids (attention + memory per layer, ~2x the mixing parameters) use fewer layers
# so the FFN stays ~2.5x wide; FFN widths are calibrated to the nominal counts (within 0.3%).
PAPER_ARGS = dict(
    vocab_size=32000,
    tie_embeddings=False,
    chunk_size=64,
    segment_len=512,
    window=512,
    persistent=16,
    loss_chunk=16384,
)
# size -> (dim, layers, heads, ffn_hidden) for LMM and for the hybrids (MAC / MAG / MAL)
_LMM_SIZES = {
    "170m": (768, 12, 12, 2912),
    "340m": (1024, 24, 16, 1824),
    "400m": (1024, 28, 16, 1984),
    "760m": (1536, 24, 16, 3136),
}
_HYBRID_SIZES = {
    "170m": (768, 10, 12, 2752),
    "340m": (1024, 16, 16, 2304),
    "400m": (1024, 18, 16, 2784),
    "760m": (1536, 16, 16, 4096),
}
NOMINAL_PARAMS: dict[str, float] = {}


def _sized(variant: str, size: tuple[int, int, int, int], **extra) -> Callable[[], TitansConfig]:
    dim, layers, heads, ffn = size
    return _titans(
        variant,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        mem_heads=heads,
        ffn_hidden=ffn,
        **PAPER_ARGS,
        **extra,
    )


TITANS_PAPER = 'Behrouz, Zhong & Mirrokni 2024, "Titans", arXiv:2501.00663'

for _variant in ("lmm", "mac", "mag", "mal"):
    register(
        ModelSpec(
            name=f"titans-{_variant}-tiny",
            family="titans",
            config_fn=_titans(_variant),
            builder=Titans,
            paper=TITANS_PAPER,
        )
    )
    _table = _LMM_SIZES if _variant == "lmm" else _HYBRID_SIZES
    for _size, _dims in _table.items():
        _name = f"titans-{_variant}-{_size}"
        register(
            ModelSpec(
                name=_name,
                family="titans",
                config_fn=_sized(_variant, _dims),
                builder=Titans,
                paper=TITANS_PAPER,
            )
        )
        NOMINAL_PARAMS[_name] = float(_size[:-1]) * 1e6
