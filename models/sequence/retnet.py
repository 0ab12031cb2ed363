"""RetNet (Sun et al. 2023; docs/models.md): multi-scale retention + FFN, decoded recurrently.

Legend: B batch, L tokens, D model width, H heads, K key dim per head, V value dim per head.

Training runs the chunkwise / parallel / Triton retention op (`RetNetConfig.mode`); a 1-token
step with a state runs the recurrent step (`retention_step`), so decoding costs O(1) per
token. All forms share one state layout (B, H, K, V + 1) and offset convention
(models/ops/retention/reference.py), so pieces of any length with the carried state equal the
whole sequence (`stream_multiple` = 1).
Block (paper section 2.3): X += MSR(norm(X)); X += FFN(norm(X)), with
MSR(X) = (swish(X W_G) * HeadNorm(Retention(X))) W_O, value width 2D, FFN width 2D (GELU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.lm import build_trunk, init_lm_weights
from models.layers.norms import RMSNorm
from models.layers.rotary import ROPE_SCHEDULES, apply_rope, rope_angles
from models.ops.retention import retention, retention_step, retnet_decay
from models.outputs import SeqOutput
from models.registry import ModelSpec, register

_TRAIN_MODES = ("auto", "chunked", "parallel", "triton")
# xPos scales k by zeta^(-n / scale_base); past this exponent fp32 / bf16 would lose the product
_XPOS_MAX_LOG = 60.0


# Against torchscale 0.3.0 (PyPI; `torchscale/architecture/retnet.py`,
# `torchscale/component/multiscale_retention.py`), with the same weights:
# - equal: rotary angles 1 / rope_theta ** linspace(0, 1, K/2) on interleaved pairs
#   (rope_schedule="torchscale"; "llama" is theta^(-2i/K), what our other models use), decays
#   1 - 2^(-5-h), k scaled by K^-1/2, D row-normalised by sqrt(row sum), parallel scores divided
#   by max(|row sum|, 1) (0.3.0's parallel form; its chunkwise form rescales by sums of |scores|
#   and its recurrent form not at all, per-row scales the head norm removes up to eps), head
#   norm RMS over each head's V with eps 1e-6 and no affine (head_norm="rms"), pre-norm RMSNorm
#   blocks with eps 1e-6, swish gate. rope_schedule also sets the xPos rotation (pos_emb="xpos");
#   torchscale's separate XPOS module (not used by its RetNet) has the llama schedule.
# - differs, by choice: FFN is a GELU MLP w2(gelu(w1 x)), width 2D (the paper's width);
#   torchscale's is a GLU fc2(act(fc1 x) * gate(x)) (act gelu in its RetNetConfig, swish in its
#   fairseq presets; width 1280 there by default, ~1.69D in the presets). Init is N(0, D^-1/2)
#   for every matrix (embedding and head included), wo / w2 scaled by 1/sqrt(2 n_layers)
#   (init_lm_weights); torchscale uses xavier_uniform gain 2^-2.5 for q, k, v, g and gain 1 for
#   out_proj (2^-1 after 0.3.0), torch's default nn.Linear init for the FFN, N(0, D^-1/2) for
#   the output projection.
#   head_norm="group" is nn.GroupNorm(H) with affine weight / bias and eps = norm_eps (1e-6);
#   torchscale's first RetNet code used a per-head LayerNorm without affine, eps 1e-5 (its
#   RetNetConfig default then; also nn.GroupNorm's default), replaced by the RMS norm above.
@dataclass(kw_only=True)
class RetNetConfig:
    vocab_size: int = 258  # byte tokenizer + 2 specials
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    value_factor: int = 2  # value / gate width = value_factor * dim (paper: 2)
    ffn_hidden: int | None = None  # default 2 * dim (paper)
    mode: str = "auto"  # training form: auto | chunked | parallel | triton
    chunk_size: int = 64  # chunked / Triton (Triton: power of two >= 16)
    pos_emb: str = "rotary"  # rotary (torchscale 0.3.0's RetNet) | xpos (paper)
    xpos_scale_base: float = 512.0
    rope_theta: float = 10000.0
    rope_schedule: str = "torchscale"  # torchscale (RetNetRelPos) | llama (theta^(-2i/K))
    head_norm: str = "rms"  # rms (torchscale, no affine) | group (paper's GroupNorm, affine)
    normalize_decay: bool = True  # D row-normalised by sqrt(row sum), as torchscale
    normalize_scores: bool = True  # scores divided by max(|row sum|, 1)
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for rotary/xPos")
        if self.mode not in _TRAIN_MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {_TRAIN_MODES}")
        if self.pos_emb not in ("rotary", "xpos"):
            raise ValueError(f"pos_emb={self.pos_emb!r} must be 'rotary' or 'xpos'")
        if self.rope_schedule not in ROPE_SCHEDULES:
            raise ValueError(
                f"rope_schedule={self.rope_schedule!r} must be one of {ROPE_SCHEDULES}"
            )
        if self.head_norm not in ("rms", "group"):
            raise ValueError(f"head_norm={self.head_norm!r} must be 'rms' or 'group'")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= 1")


@dataclass
class RetNetState:
    """Per-layer retention states (B, H, K, V + 1 when normalize_scores) and tokens seen."""

    states: list[torch.Tensor]
    pos: int


def xpos_scales(positions: torch.Tensor, head_dim: int, scale_base: float) -> torch.Tensor:
    """xPos (Sun et al. 2022) log-scales (L, head_dim // 2): q gets exp(+s), k exp(-s).

    zeta_i = (2i / d + 0.4) / 1.4 per rotary pair, s = n log(zeta_i) / scale_base, so q_n . k_m
    carries zeta^((n - m) / scale_base): a relative, per-dimension decay on top of the rotation.
    """
    zeta = (torch.arange(0, head_dim, 2, device=positions.device).float() + 0.4 * head_dim) / (
        1.4 * head_dim
    )
    return positions.float()[:, None] * torch.log(zeta)[None, :] / scale_base


def _apply_pair_scale(x_BHLK: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    return x_BHLK * torch.exp(log_scale).repeat_interleave(2, dim=-1).to(x_BHLK.dtype)


class MultiScaleRetention(nn.Module):
    """MSR: per-head decay gamma_h = 1 - 2^(-5-h), swish gate, per-head norm, output proj."""

    def __init__(self, cfg: RetNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.key_dim = cfg.dim // cfg.n_heads
        vdim = cfg.value_factor * cfg.dim
        self.value_dim = vdim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, vdim, bias=False)
        self.wg = nn.Linear(cfg.dim, vdim, bias=False)
        self.wo = nn.Linear(vdim, cfg.dim, bias=False)
        if cfg.head_norm == "group":
            self.group_norm = nn.GroupNorm(cfg.n_heads, vdim, eps=cfg.norm_eps)
        # a buffer, not a parameter: RetNet fixes the decays (the Triton path has no d/dgamma)
        self.register_buffer("decay", retnet_decay(cfg.n_heads), persistent=False)

    def _rotate(self, q, k, pos0: int):
        L = q.shape[2]
        pos = torch.arange(pos0, pos0 + L, device=q.device)
        cos, sin = rope_angles(pos, self.key_dim, self.cfg.rope_theta, self.cfg.rope_schedule)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cfg.pos_emb == "xpos":
            s = xpos_scales(pos, self.key_dim, self.cfg.xpos_scale_base)
            if s.numel() and s.abs().max() > _XPOS_MAX_LOG:
                raise ValueError(
                    f"xPos scales overflow past position {pos0 + L}: use pos_emb='rotary' or a "
                    f"larger xpos_scale_base (now {self.cfg.xpos_scale_base})"
                )
            q, k = _apply_pair_scale(q, s), _apply_pair_scale(k, -s)
        return q, k

    def _head_norm(self, o_BLHV: torch.Tensor) -> torch.Tensor:
        if self.cfg.head_norm == "rms":
            return F.rms_norm(o_BLHV.float(), (self.value_dim,), eps=self.cfg.norm_eps)
        b, L = o_BLHV.shape[:2]
        gn = self.group_norm  # fp32 whatever the parameter dtype (FSDP mixed precision)
        y = F.group_norm(
            o_BLHV.reshape(b * L, -1).float(),
            self.n_heads,
            gn.weight.float(),
            gn.bias.float(),
            self.cfg.norm_eps,
        )
        return y.view_as(o_BLHV)

    def forward(
        self, x_BLD: torch.Tensor, pos0: int, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, L, _ = x_BLD.shape
        heads = lambda t, d: t.view(b, L, self.n_heads, d).transpose(1, 2)
        q = heads(self.wq(x_BLD), self.key_dim)
        k = heads(self.wk(x_BLD), self.key_dim)
        v = heads(self.wv(x_BLD), self.value_dim)
        q, k = self._rotate(q, k, pos0)
        norms = dict(
            normalize_decay=self.cfg.normalize_decay, normalize_scores=self.cfg.normalize_scores
        )
        if L == 1 and state is not None:  # decoding one token from a state: the recurrent step
            o, new_state = retention_step(
                q, k, v, self.decay, initial_state=state, offset=pos0, **norms
            )
        else:
            o, new_state = retention(
                q,
                k,
                v,
                self.decay,
                impl=self.cfg.mode,
                initial_state=state,
                offset=pos0,
                chunk_size=self.cfg.chunk_size,
                **norms,
            )
        o = self._head_norm(o.transpose(1, 2)).reshape(b, L, -1).to(x_BLD.dtype)
        return self.wo(F.silu(self.wg(x_BLD)) * o), new_state


class FeedForward(nn.Module):
    """GELU FFN of the paper (width 2D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class RetNetBlock(nn.Module):
    def __init__(self, cfg: RetNetConfig) -> None:
        super().__init__()
        self.msr_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.msr = MultiScaleRetention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_hidden or 2 * cfg.dim)

    def forward(self, x, pos0: int, state=None):
        h, new_state = self.msr(self.msr_norm(x), pos0, state)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), new_state


class RetNet(nn.Module):
    """`model(tokens (B, L), state=None) -> SeqOutput(logits (B, L, V), state=RetNetState)`."""

    def __init__(self, cfg: RetNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stream_multiple = 1  # every retention form continues exactly from any offset
        build_trunk(self, cfg, RetNetBlock)
        init_lm_weights(self, cfg.dim, cfg.n_layers)

    def forward(self, tokens: torch.Tensor, state: RetNetState | None = None) -> SeqOutput:
        pos0 = state.pos if state is not None else 0
        x = self.embed(tokens)
        keep = state is not None or not self.training
        new_states = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, pos0, state.states[i] if state is not None else None)
            if keep:
                new_states.append(s)
        logits = self.head(self.norm(x))
        return SeqOutput(logits, RetNetState(new_states, pos0 + tokens.shape[1]) if keep else None)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params + chunkwise retention (fwd + 2x bwd).

        Per head and token the chunk form does a causal (C x K) score row, a (C x V) mix, and two
        (K x V) state products (read and write), C = min(chunk, seq_len).
        """
        n = sum(p.numel() for p in self.parameters()) - self.embed.weight.numel()
        c = min(self.cfg.chunk_size, seq_len)
        K = self.cfg.dim // self.cfg.n_heads
        V = self.cfg.value_factor * K
        per_head = c * (K + V) + 4 * K * V
        return 6 * n + 6 * self.cfg.n_layers * self.cfg.n_heads * per_head


def _cfg(**kw) -> RetNetConfig:
    return RetNetConfig(**kw)


# Paper sizes (the paper's table, docs/models.md; not checked against a checkpoint); vocab
# 32000 is our choice: the paper's LM vocabulary was not available to check. The 1.3B FFN is
# narrowed (3712 instead of 2 * 2048) so the untied 32K-vocab model lands on its nominal size;
# 2.7B / 6.7B keep the paper's 2D.
_SIZES = {
    "retnet-tiny": lambda: _cfg(dim=64, n_layers=2, n_heads=4, chunk_size=16),
    "retnet-1.3b": lambda: _cfg(
        vocab_size=32000, dim=2048, n_layers=24, n_heads=8, ffn_hidden=3712
    ),
    "retnet-2.7b": lambda: _cfg(vocab_size=32000, dim=2560, n_layers=32, n_heads=10),
    "retnet-6.7b": lambda: _cfg(vocab_size=32000, dim=4096, n_layers=32, n_heads=16),
}

RETNET_PAPER = 'Sun et al. 2023, "Retentive Network", arXiv:2307.08621'

for _name, _fn in _SIZES.items():
    register(
        ModelSpec(name=_name, family="retnet", config_fn=_fn, builder=RetNet, paper=RETNET_PAPER)
    )

NOMINAL_PARAMS = {"retnet-1.3b": 1.3e9, "retnet-2.7b": 2.7e9, "retnet-6.7b": 6.7e9}
