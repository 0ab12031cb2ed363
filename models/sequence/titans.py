"""Titans (Behrouz et al. 2024) and its Miras variants (Behrouz et al. 2025): the models.

Legend: B batch, L length, C model width (`dim`), H heads, D head width.

The models (§4): LMM, MAC, MAG, MAL around the long-term memory layer `NeuralMemory`
(models/layers/neural_memory.py: projections, short conv, gates, the memory op, output gate).

Persistent memory: `persistent` learnable tokens per layer are an always-visible prefix of the
layer's attention (input-independent keys / values). The paper prepends them to the input;
through causal layers their states stay input-independent, so a per-layer prefix is the same
family of functions, and it keeps streaming exact (the memory sees only real tokens, its
learnable initial state playing the part of M([P])).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.attention import attention
from models.layers.loss import chunked_lm_loss
from models.layers.mlp import SwiGLU, swiglu_hidden
from models.layers.neural_memory import NeuralMemory, NeuralMemoryState
from models.layers.norms import RMSNorm
from models.layers.rotary import apply_rope, rope_angles
from models.outputs import SeqOutput
from models.registry import ModelSpec, register

# The Miras models reuse these (models/sequence/miras.py).

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
    # Long-context memory savers. mem_recompute_every = N > 0: while training, the memory layer
    # runs in pieces of N tokens, each recomputed in backward, so backward keeps only the memory
    # state at the N-token boundaries (NeuralMemory's `recompute_every`, a multiple of
    # chunk_size; MAC: any N > 0 recomputes each whole segment of `segment_len`, attention and
    # FFN included); 0 = off. Apart from the job's scaling.activation_checkpointing, which
    # recomputes whole blocks. loss_chunk: cross-entropy in chunks of `loss_chunk` positions
    # inside forward (0 = return full logits; `Titans.fused_loss`).
    mem_recompute_every: int = 0
    loss_chunk: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # "auto": the Triton kernels on CUDA where they cover the rule (Titans' l2 / l2, depth 1-2),
    # the chunked PyTorch form otherwise and on CPU (identical there). On an H100 the op ran
    # 156-275k tok/s in Triton against 21-27k chunked (benchmarks/memory_vs_titans_pytorch.py).
    mem_impl: str = "auto"
    # Deprecated name of mem_recompute_every, still accepted (saved configs and recipes pass it:
    # launch/titans_2m.py); moved onto mem_recompute_every at construction and cleared, so a
    # config holds the value once.
    mem_checkpoint: int | None = None

    def __post_init__(self) -> None:
        if self.mem_checkpoint is not None:
            if self.mem_recompute_every not in (0, self.mem_checkpoint):
                raise ValueError(
                    f"mem_checkpoint={self.mem_checkpoint} is the deprecated name of "
                    f"mem_recompute_every={self.mem_recompute_every}; pass mem_recompute_every only"
                )
            warnings.warn(
                "TitansConfig.mem_checkpoint is deprecated: it is mem_recompute_every (the same "
                "number of tokens)",
                DeprecationWarning,
                stacklevel=3,
            )
            self.mem_recompute_every, self.mem_checkpoint = self.mem_checkpoint, None
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
        if self.mem_recompute_every < 0 or self.mem_recompute_every % self.chunk_size:
            raise ValueError(
                f"mem_recompute_every={self.mem_recompute_every} must be 0 (off) or a multiple of "
                "chunk_size="
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
            # MAC recomputes whole segments itself (_mac), the memory's write included
            recompute_every=0 if cfg.variant == "mac" else cfg.mem_recompute_every,
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
            m, st["mem"] = self.memory(self.mem_norm(x), st.get("mem"))
            x = x + m
        elif v == "mal":
            m, st["mem"] = self.memory(self.mem_norm(x), st.get("mem"))
            x = x + m
            a, st["kv"] = self.attn(self.attn_norm(x), st.get("pos", 0), st.get("kv"))
            x = x + a
        elif v == "mag":
            u = self.mem_norm(x)
            a, st["kv"] = self.attn(self.attn_norm(x), st.get("pos", 0), st.get("kv"))
            m, st["mem"] = self.memory(u, st.get("mem"))
            x = x + self.gate(a, m)
        else:
            # MAC is segment-wise end to end: the FFN runs inside each (recomputed) segment,
            # so a 2M-token block never holds full-length FFN activations.
            x, st["mem"] = self._mac(x, st.get("mem"))
            st["pos"] = st.get("pos", 0) + x.shape[1]
            return x, st
        st["pos"] = st.get("pos", 0) + x.shape[1]
        return x + self.ffn(self.ffn_norm(x)), st

    def _recomputing(self) -> bool:
        """Whether MAC's segments are recomputed in backward (mem_recompute_every > 0)."""
        return self.training and torch.is_grad_enabled() and self.cfg.mem_recompute_every > 0

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
        if self._recomputing():
            return self.memory.scan(self._mac_segment, x, mem, seg, self)
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

    @property
    def fused_loss(self) -> bool:
        """True when the model computes its loss inside forward (cfg.loss_chunk > 0): called
        with `targets=` (and `loss_mask=`) it returns `out.loss` from the chunked cross-entropy
        and no logits, never materialising (B, L, vocab). The training task reads this
        (`getattr(model, "fused_loss", False)`, system/tasks/lm.py) to pass targets instead of
        taking the loss over returned logits; models without the property return logits."""
        return self.cfg.loss_chunk > 0

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
