"""Landmark Attention (Mohtashami & Jaggi 2023, docs/models.md, Landmark): a rotary/SwiGLU decoder
whose attention reaches past blocks only through their landmark tokens.

Legend: B batch, H heads, n tokens of a piece, n' the piece with landmarks, T local keys,
F = mem_freq, S = F + 1 section length, NB cached blocks, k' retrieved blocks, Dh head dim.

The model inserts a landmark token (id `vocab_size`, an extra embedding row) after every F
tokens, runs the layers on the extended sequence and returns logits at the original positions
only. Training (no state) uses the grouped-softmax op `landmark_attention` over the whole
extended sequence. With a state, attention runs from a block cache: each query scores the
landmark keys of all completed blocks, retrieves the top `cache_topk` blocks and attends to them
plus its own (incomplete) section with the same grouped softmax; the cost per query is fixed
(k' * F + S keys) however long the context grows.

Streaming is approximate BY DESIGN when `cache_topk` < number of completed blocks: blocks that
are not retrieved are invisible. With `cache_topk=None` (all blocks) it equals the whole-sequence
forward for pieces of any length. `cache_positions="compressed"` (epfml's inference) places the
retrieved blocks, in order, directly before the query's section, so rotary distances stay within
the trained range; "absolute" keeps every key at its true position. Both are exact at top-k=all.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.lm import init_lm_weights
from models.layers.mlp import SwiGLU, swiglu_hidden
from models.layers.norms import RMSNorm
from models.layers.rotary import apply_rope
from models.ops.landmark import landmark_attention
from models.outputs import SeqOutput
from models.registry import ModelSpec, register


@dataclass(kw_only=True)
class LandmarkConfig:
    vocab_size: int = 258  # byte tokenizer + 2 specials; the landmark id is vocab_size
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int | None = None  # default: SwiGLU 8/3 * dim rounded to 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    mem_freq: int = 8  # ordinary tokens per block (paper: 50)
    cache_topk: int | None = None  # blocks retrieved per query when streaming; None = all
    cache_selection: str = "per_token_and_head"  # | "max_over_heads"
    cache_positions: str = "compressed"  # | "absolute"
    query_chunk: int = 256  # streaming queries processed at once (bounds gathered-key memory)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.mem_freq < 1:
            raise ValueError(f"mem_freq={self.mem_freq} must be >= 1")
        if self.cache_topk is not None and self.cache_topk < 1:
            raise ValueError(f"cache_topk={self.cache_topk} must be >= 1 or None (all blocks)")
        if self.cache_selection not in ("per_token_and_head", "max_over_heads"):
            raise ValueError(f"cache_selection={self.cache_selection!r} is unknown")
        if self.cache_positions not in ("compressed", "absolute"):
            raise ValueError(f"cache_positions={self.cache_positions!r} is unknown")


@dataclass
class BlockCache:
    """One layer's raw (un-rotated) keys: completed blocks, their landmark keys, the tail."""

    k_blocks: torch.Tensor  # (B, H, NB, F, Dh)
    v_blocks: torch.Tensor  # (B, H, NB, F, Dh)
    k_marks: torch.Tensor  # (B, H, NB, Dh); landmark values are never mixed in
    k_tail: torch.Tensor  # (B, H, r, Dh): tokens of the incomplete section
    v_tail: torch.Tensor


@dataclass
class LandmarkState:
    """Per-layer block caches; `pos` counts positions of the extended (landmarked) sequence."""

    caches: list[BlockCache]
    pos: int


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary at arbitrary (broadcastable) integer positions, same arithmetic as rope_angles."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device).float() / d))
    ang = pos.float()[..., None] * inv
    return apply_rope(x, ang.cos(), ang.sin())


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, H, NB, *rest), idx (B, H, n, k) -> (B, H, n, k, *rest)."""
    rest = t.shape[3:]
    src = t.unsqueeze(2).expand(*idx.shape[:3], *t.shape[2:])
    index = idx.view(*idx.shape, *([1] * len(rest))).expand(*idx.shape, *rest)
    return src.gather(3, index)


def _empty_cache(b: int, h: int, f: int, d: int, like: torch.Tensor) -> BlockCache:
    z = like.new_zeros
    return BlockCache(
        z(b, h, 0, f, d), z(b, h, 0, f, d), z(b, h, 0, d), z(b, h, 0, d), z(b, h, 0, d)
    )


def _extend(cache: BlockCache, k: torch.Tensor, v: torch.Tensor, f: int) -> BlockCache:
    """Append a piece's raw keys/values; sections it completes move into the block store."""
    kj, vj = torch.cat([cache.k_tail, k], 2), torch.cat([cache.v_tail, v], 2)
    s = f + 1
    nb = kj.shape[2] // s
    kf, vf = kj[:, :, : nb * s].unflatten(2, (nb, s)), vj[:, :, : nb * s].unflatten(2, (nb, s))
    return BlockCache(
        torch.cat([cache.k_blocks, kf[:, :, :, :f]], 2),
        torch.cat([cache.v_blocks, vf[:, :, :, :f]], 2),
        torch.cat([cache.k_marks, kf[:, :, :, f]], 2),
        kj[:, :, nb * s :],
        vj[:, :, nb * s :],
    )


class LandmarkAttention(nn.Module):
    def __init__(self, cfg: LandmarkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BLD: torch.Tensor, cache: BlockCache | None, keep: bool):
        b, n, _ = x_BLD.shape
        heads = lambda t: t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        q, k, v = heads(self.wq(x_BLD)), heads(self.wk(x_BLD)), heads(self.wv(x_BLD))
        f, theta = self.cfg.mem_freq, self.cfg.rope_theta
        if cache is None:  # training form: the whole sequence from position 0
            pos = torch.arange(n, device=x_BLD.device)
            o = landmark_attention(_rope(q, pos, theta), _rope(k, pos, theta), v, f)
            base = _empty_cache(b, self.n_heads, f, self.head_dim, k) if keep else None
        else:
            # fp32 inside, as the training op: the cached softmaxes must match it
            fc = BlockCache(*(getattr(cache, fld.name).float() for fld in fields(BlockCache)))
            qf, kf, vf = q.float(), k.float(), v.float()
            step = self.cfg.query_chunk
            o = torch.cat(
                [self._cached(qf[:, :, i : i + step], kf, vf, fc, i) for i in range(0, n, step)],
                dim=2,
            ).to(v.dtype)
            base = cache
        new = _extend(base, k, v, f) if base is not None else None
        return self.wo(o.transpose(1, 2).reshape(b, n, -1)), new

    def _cached(self, q, k, v, cache: BlockCache, i0: int) -> torch.Tensor:
        """Queries q = piece positions i0.. attending from the cache plus the piece's keys k, v."""
        cfg, f = self.cfg, self.cfg.mem_freq
        s, theta, scale = f + 1, cfg.rope_theta, self.head_dim**-0.5
        dev = q.device
        r, nb_old = cache.k_tail.shape[2], cache.k_blocks.shape[2]
        origin = nb_old * s  # absolute position of local index 0 (start of the tail)
        kj, vj = torch.cat([cache.k_tail, k], 2), torch.cat([cache.v_tail, v], 2)
        T, nq = kj.shape[2], q.shape[2]
        t_q = r + i0 + torch.arange(nq, device=dev)  # local index of each query
        t_k = torch.arange(T, device=dev)
        qr = _rope(q, origin + t_q, theta)

        # own (incomplete) section: its ordinary tokens up to the query, never its landmark
        local_ok = (
            (t_k[None] // s == t_q[:, None] // s)
            & (t_k[None] % s != f)
            & (t_k[None] <= t_q[:, None])
        )
        s_loc = (qr @ _rope(kj, origin + t_k, theta).transpose(-1, -2)) * scale
        s_loc = s_loc.masked_fill(~local_ok, float("-inf"))

        # every completed block: cached ones, then those completed inside this piece
        nb_new = T // s
        full_k = kj[:, :, : nb_new * s].unflatten(2, (nb_new, s))
        full_v = vj[:, :, : nb_new * s].unflatten(2, (nb_new, s))
        k_blocks = torch.cat([cache.k_blocks, full_k[:, :, :, :f]], 2)
        v_blocks = torch.cat([cache.v_blocks, full_v[:, :, :, :f]], 2)
        marks = torch.cat([cache.k_marks, full_k[:, :, :, f]], 2)
        nb = nb_old + nb_new
        k_sel = nb if cfg.cache_topk is None else min(cfg.cache_topk, nb)
        if k_sel == 0:
            return torch.softmax(s_loc, -1) @ vj

        section = nb_old + t_q // s  # (nq,) absolute section of each query
        eligible = torch.arange(nb, device=dev)[None, :] < section[:, None]  # (nq, NB)
        if cfg.cache_positions == "absolute":
            mark_pos = torch.arange(nb, device=dev) * s + f
            score = qr @ _rope(marks, mark_pos, theta).transpose(-1, -2)
        else:  # every candidate as if it sat right before the query's section
            score = _rope(q, (t_q % s) + 1, theta) @ marks.transpose(-1, -2)
        score = score.masked_fill(~eligible, float("-inf"))
        if cfg.cache_selection == "max_over_heads":
            score = torch.softmax(score, -1).nan_to_num(0.0).amax(1, keepdim=True)
            score = score.masked_fill(~eligible, float("-inf")).expand(-1, self.n_heads, -1, -1)
        idx = score.topk(k_sel, dim=-1).indices  # (B, H, nq, k')
        valid = eligible[None, None].expand_as(score).gather(-1, idx)
        # retrieved blocks in their original order, the empty picks last
        idx = torch.where(valid, idx, idx + nb).sort(-1).values
        valid = idx < nb
        idx = torch.where(valid, idx, idx - nb)
        if cfg.cache_positions == "absolute":
            block_pos = idx
        else:
            j = torch.arange(k_sel, device=dev)
            block_pos = section[:, None] - valid.sum(-1, keepdim=True) + j

        t = torch.arange(f, device=dev)
        kb = _rope(_take(k_blocks, idx), block_pos[..., None] * s + t, theta)  # (B,H,nq,k',F,Dh)
        km = _rope(_take(marks, idx), block_pos * s + f, theta)  # (B, H, nq, k', Dh)
        s_mark = torch.einsum("bhnd,bhnkd->bhnk", qr, km) * scale
        s_mark = s_mark.masked_fill(~valid, float("-inf"))
        p_top = torch.softmax(torch.cat([s_loc, s_mark], -1), -1)
        p_loc, p_mark = p_top[..., :T], p_top[..., T:]
        p_grp = torch.softmax(torch.einsum("bhnd,bhnkfd->bhnkf", qr, kb) * scale, -1)
        w = torch.einsum("bhnkf,bhnkfd->bhnkd", p_grp, _take(v_blocks, idx))
        return p_loc @ vj + torch.einsum("bhnk,bhnkd->bhnd", p_mark, w)


class LandmarkBlock(nn.Module):
    def __init__(self, cfg: LandmarkConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = LandmarkAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden or swiglu_hidden(cfg.dim))

    def forward(self, x, cache=None, keep: bool = False):
        h, new_cache = self.attn(self.attn_norm(x), cache, keep)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), new_cache


def insert_landmarks(
    tokens: torch.Tensor, done: int, mem_freq: int, landmark_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, n) -> (extended ids (B, n'), index of each original token in them (n,)).

    `done` = tokens already in the current block; a landmark follows every mem_freq-th token.
    """
    n = tokens.shape[1]
    j = torch.arange(n, device=tokens.device)
    tok_idx = j + (done + j) // mem_freq
    ids = tokens.new_full((tokens.shape[0], n + (done + n) // mem_freq), landmark_id)
    ids[:, tok_idx] = tokens
    return ids, tok_idx


class LandmarkLM(nn.Module):
    """`model(tokens (B, L), state=None) -> SeqOutput(logits (B, L, V), state=LandmarkState)`."""

    def __init__(self, cfg: LandmarkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stream_multiple = 1  # the cache carries the incomplete section: any piece length
        self.embed = nn.Embedding(cfg.vocab_size + 1, cfg.dim)  # + the landmark token
        self.layers = nn.ModuleList(LandmarkBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        init_lm_weights(self, cfg.dim, cfg.n_layers)

    def forward(self, tokens: torch.Tensor, state: LandmarkState | None = None) -> SeqOutput:
        f = self.cfg.mem_freq
        done = state.caches[0].k_tail.shape[2] if state is not None else 0
        ids, tok_idx = insert_landmarks(tokens, done, f, self.cfg.vocab_size)
        x = self.embed(ids)
        keep = state is not None or not self.training
        caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, state.caches[i] if state is not None else None, keep)
            if keep:
                caches.append(c)
        h = self.norm(x[:, tok_idx])
        w = self.embed.weight[: self.cfg.vocab_size] if self.head is None else self.head.weight
        logits = F.linear(h, w)
        pos0 = state.pos if state is not None else 0
        return SeqOutput(logits, LandmarkState(caches, pos0 + ids.shape[1]) if keep else None)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per original token: (F+1)/F positions each, dense causal attention."""
        n = sum(p.numel() for p in self.parameters()) - self.embed.weight.numel()
        grow = (self.cfg.mem_freq + 1) / self.cfg.mem_freq
        return grow * (6 * n + 6 * self.cfg.n_layers * self.cfg.dim * seq_len * grow)


_SIZES = {
    "landmark-tiny": lambda: LandmarkConfig(dim=64, n_layers=2, n_heads=4, mem_freq=8),
    # epfml lm_benchmark PG19 model: 12 layers, d 1024, 8 heads, GPT-2 vocab padded to 50304,
    # mem_freq 50, tied head; SwiGLU width 2752 ~ the 8 d^2 of its 4d GELU MLP.
    "landmark-pg19": lambda: LandmarkConfig(
        vocab_size=50304,
        dim=1024,
        n_layers=12,
        n_heads=8,
        ffn_hidden=2752,
        mem_freq=50,
        cache_topk=4,
    ),
}

LANDMARK_PAPER = 'Mohtashami & Jaggi 2023, "Landmark Attention", arXiv:2305.16300'

for _name, _fn in _SIZES.items():
    register(
        ModelSpec(
            name=_name, family="landmark", config_fn=_fn, builder=LandmarkLM, paper=LANDMARK_PAPER
        )
    )

# epfml's GPT-2 base at these sizes: 12 * (12 d^2 + 2 d) + 50304 d + d = 202.5M
NOMINAL_PARAMS = {"landmark-pg19": 202.5e6}
