"""Data sources. `build_loader` picks one by `data.source`; all follow data/base.py."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data.base import BatchLoader
    from system.config import DataConfig

# source name -> "module:function(cfg, *, seq_len, batch_size, rank, world, seed, split)"
_SOURCES = {
    "passkey": "data.synthetic:build_passkey_loader",
    "niah": "data.synthetic:build_passkey_loader",
    "text": "data.text:build_text_loader",
    "shards": "data.shards:build_shard_loader",
}


def build_loader(
    cfg: DataConfig,
    *,
    seq_len: int,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    split: str = "train",
) -> BatchLoader:
    """A resumable loader of (batch_size, seq_len + 1) token batches for this rank.

    `split="eval"` gives a held-out stream (a different seed or a held-out slice, per source).
    """
    target = _SOURCES[cfg.source]
    mod_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    return fn(
        cfg, seq_len=seq_len, batch_size=batch_size, rank=rank, world=world, seed=seed, split=split
    )
