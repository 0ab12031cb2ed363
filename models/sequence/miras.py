"""Miras models (docs/models.md): Moneta, Yaad, Memora — the Titans LMM stack with other memories.

Miras replaces attention by a memory module in a Llama-style block, and varies the memory's
attentional bias and retention (no momentum: "chunked training as in Titans, but without
momentum"). The memory op implements each choice (models/ops/memory, definitions there):
  moneta  lp bias (p = 3), lq retention (q = 4, normalised at chunk boundaries), MLP memory
  yaad    Huber bias with a data-dependent delta, l2 retention, MLP memory
  memora  l2 bias, KL retention (memory on the simplex), linear memory (the op's kl is
          defined for a matrix memory)
Gates: channel-wise theta / alpha (per head and key channel) from a low-rank projection of x,
as Miras' "channel-wise parameters" from low-rank (32 / 64) projections; which rank goes with
which size is not in the text we have, so ours: 32 up to 340M (and tiny), 64 above
(`TitansConfig.gate_rank`; what "channel-wise" scales: models/ops/memory/reference.py, "Gates").
Sizes: 340M (24 layers, d 1024) and 760M (24, 1536) as in the paper, 1.3B (24, 2048) [layers
unverified]; FFN widths calibrated to the nominal counts on a 32K vocab, low-rank gates included.
"""

from __future__ import annotations

from models.registry import ModelSpec, register
from models.sequence.titans import PAPER_ARGS, Titans, TitansConfig

_RULES = {
    "moneta": dict(attn_bias="lp", retention="lq", mem_depth=2),
    "yaad": dict(attn_bias="huber", retention="l2", mem_depth=2),
    "memora": dict(attn_bias="l2", retention="kl", mem_depth=1),
}
# name -> size -> (dim, layers, heads, ffn_hidden)
_SIZES = {
    "moneta": {
        "340m": (1024, 24, 16, 1792),
        "760m": (1536, 24, 16, 3104),
        "1.3b": (2048, 24, 16, 4096),
    },
    "yaad": {
        "340m": (1024, 24, 16, 1792),
        "760m": (1536, 24, 16, 3104),
        "1.3b": (2048, 24, 16, 4096),
    },
    # A linear memory has fewer initial-state parameters: a wider FFN makes up the count.
    "memora": {
        "340m": (1024, 24, 16, 1952),
        "760m": (1536, 24, 16, 3328),
        "1.3b": (2048, 24, 16, 4416),
    },
}
_GATE_RANK = {None: 32, "340m": 32, "760m": 64, "1.3b": 64}
NOMINAL_PARAMS: dict[str, float] = {}


def _config(name: str, size: tuple[int, int, int, int] | None, rank: int):
    def make() -> TitansConfig:
        # Miras' MLP memory is M(x) = x + LN(MLP(x)) (docs/models.md, Miras): the norm is on.
        base = dict(variant="lmm", momentum=False, mem_norm=True, gate_rank=rank, **_RULES[name])
        if size is None:
            return TitansConfig(**base)
        dim, layers, heads, ffn = size
        # Channel-wise gates make each chunk's backward keep (T, T, Din) layer-1 coefficients
        # (measured: 5.5x the saved tensors of per-head gates at depth 2, 2.2x for Memora), so
        # the paper sizes recompute the memory every 512 tokens: backward keeps the state at
        # those boundaries and recomputes one piece at a time.
        return TitansConfig(
            dim=dim,
            n_layers=layers,
            n_heads=heads,
            mem_heads=heads,
            ffn_hidden=ffn,
            mem_recompute_every=512,
            **PAPER_ARGS,
            **base,
        )

    return make


MIRAS_PAPER = 'Behrouz et al. 2025, "It\'s All Connected" (Miras), arXiv:2504.13173'

for _name, _table in _SIZES.items():
    register(
        ModelSpec(
            name=f"{_name}-tiny",
            family="miras",
            config_fn=_config(_name, None, _GATE_RANK[None]),
            builder=Titans,
            paper=MIRAS_PAPER,
        )
    )
    for _size, _dims in _table.items():
        register(
            ModelSpec(
                name=f"{_name}-{_size}",
                family="miras",
                config_fn=_config(_name, _dims, _GATE_RANK[_size]),
                builder=Titans,
                paper=MIRAS_PAPER,
            )
        )
        NOMINAL_PARAMS[f"{_name}-{_size}"] = float(_size[:-1]) * (
            1e9 if _size.endswith("b") else 1e6
        )
