"""The Titans / Miras long-term memory layer, `NeuralMemory`, and the state it carries.

Legend: B batch, L length, C model width (`dim`), H heads, D head width, K conv kernel.

`NeuralMemory` is the long-term memory block of Titans §4.4: SiLU'd q/k/v projections, each
followed by a short causal depthwise conv, l2-normalised q and k, data-dependent per-token gates
(step theta, momentum eta, forget alpha; per head, or per head and key channel from a low-rank
projection with `gate_rank`, the Miras presets), a per-head MLP memory written token by token
with the chunked op of `models.ops.memory`, then an output RMSNorm, a SiLU output gate and a
projection. The models built around it (LMM, MAC, MAG, MAL): models/sequence/titans.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.fused_nodes import conv_silu_norm, norm_gate
from models.layers.norms import RMSNorm
from models.layers.precision import upcast
from models.layers.segment_scan import checkpointed_scan
from models.ops.memory import MemoryRule, MemoryState, neural_memory
from models.ops.memory import retrieve as memory_retrieve


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
    with depth 1; momentum=False for those, as in Miras). impl picks the op's form
    (models.ops.memory: "auto", the default as in TitansConfig.mem_impl, is Triton on CUDA
    where it covers the rule and the chunked form otherwise; 'reference' runs the token loop,
    for tests). recompute_every=N > 0 (TitansConfig.mem_recompute_every) runs a long training
    input in pieces of N tokens, each recomputed alone in backward: backward keeps the state
    at the N-token boundaries and one piece's activations, not the whole input's (a multiple
    of chunk_size; 0 = off; only while training with gradients).
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
        impl: str = "auto",
        recompute_every: int = 0,
        norm: bool = False,
        gate_rank: int = 0,
    ) -> None:
        super().__init__()
        if head_dim is None and dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}; pass head_dim")
        head_dim = head_dim or dim // heads
        if recompute_every < 0 or recompute_every % chunk_size:
            raise ValueError(
                f"recompute_every={recompute_every} must be 0 (off) or a multiple of "
                f"chunk_size={chunk_size}, so the recomputed pieces line up with the chunks"
            )
        if depth < 1 or chunk_size < 1 or conv_kernel < 1:
            raise ValueError("depth, chunk_size and conv_kernel must be >= 1")
        if gate_rank < 0:
            raise ValueError(f"gate_rank must be >= 0, got {gate_rank}")
        if gate_rank and momentum:
            raise ValueError("gate_rank > 0 (channel-wise gates, Miras) needs momentum=False")
        self.heads, self.head_dim, self.chunk_size = heads, head_dim, chunk_size
        self.max_lr, self.impl, self.kernel = max_lr, impl, conv_kernel
        self.recompute_every = recompute_every
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
        n = self.recompute_every
        if n and self.training and torch.is_grad_enabled() and length > n:
            return self.scan(self._pieces, x_BLC, state, n, self)
        return self._pieces(x_BLC, state)

    def _pieces(self, x_BLC: Tensor, state: NeuralMemoryState) -> tuple[Tensor, NeuralMemoryState]:
        """`_forward` over the input, on CPU in pieces of ~CPU_PIECE_TOKENS (same result)."""
        b, length, _ = x_BLC.shape
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
        )
        aligned = length % self.chunk_size == 0
        return self._output(x_BLC, y), NeuralMemoryState(mem, conv_cache, aligned)

    def scan(
        self,
        fn: Callable[[Tensor, NeuralMemoryState], tuple[Tensor, NeuralMemoryState]],
        x: Tensor,
        state: NeuralMemoryState | None,
        seg: int,
        owner: nn.Module,
    ) -> tuple[Tensor, NeuralMemoryState]:
        """fn(x_j, state) over segments of `seg` tokens of x (B, L, ...), the memory state
        carried, each segment recomputed alone in backward (models/layers/segment_scan.py):
        backward keeps x and one memory state per segment, and no forward graph. `fn` reads
        this layer (its own pieces with `recompute_every`; MAC: a whole block segment) and
        `owner` is the module whose parameters fn reads."""
        depth = len(self.memory_init)

        def step(x_j: Tensor, ts: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
            y, st = fn(x_j, NeuralMemoryState.from_tensors(ts, depth))
            return y, st.tensors()

        state = state or self.initial_state(x.shape[0])
        params = [p for p in owner.parameters() if p.requires_grad]
        y, ts = checkpointed_scan(step, x, state.tensors(), params, seg)
        out = NeuralMemoryState.from_tensors(ts, depth)
        out.aligned = x.shape[1] % self.chunk_size == 0
        return y, out

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
