"""Plain-text files as a token stream: files -> tokens -> fixed windows, shuffled per epoch.

Small corpora only (held in memory); large ones go through `mnemo data text` and the shard
reader. Window i of epoch e is a pure function of (seed, e, i), so any world size sees the same
global order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.base import IndexedLoader
from data.tokenizers import load_tokenizer

if TYPE_CHECKING:
    from system.config import DataConfig

_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tex", ".html", ""}


def list_text_files(spec: str) -> list[Path]:
    """Files named in `spec` (comma separated files or directories, recursive), sorted."""
    out: list[Path] = []
    for part in [p for p in spec.split(",") if p]:
        p = Path(part)
        if p.is_dir():
            out.extend(
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES
            )
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"data.path entry {part!r} is neither a file nor a directory")
    if not out:
        raise ValueError(f"data.path={spec!r} holds no text files")
    return out


def load_corpus(spec: str, tokenizer: str) -> np.ndarray:
    """All files' tokens joined by the tokenizer's separator, as one int64 array."""
    tok = load_tokenizer(tokenizer)
    pieces: list[np.ndarray] = []
    sep = np.array([tok.sep_id], dtype=np.int64)
    for f in list_text_files(spec):
        pieces.append(tok.encode(f.read_bytes()).astype(np.int64))
        pieces.append(sep)
    return np.concatenate(pieces)


def build_text_loader(
    cfg: DataConfig,
    *,
    seq_len: int,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    split: str = "train",
) -> IndexedLoader:
    """Windows of seq_len + 1 tokens (stride seq_len); the last `eval_fraction` are held out."""
    corpus = load_corpus(cfg.path, cfg.tokenizer)
    n_win = (len(corpus) - 1) // seq_len
    if n_win < 1:
        raise ValueError(
            f"data.path={cfg.path!r} has {len(corpus)} tokens, fewer than train.seq_len+1"
        )
    n_eval = math.ceil(cfg.eval_fraction * n_win) if cfg.eval_fraction > 0 else 0
    if split == "eval":
        if n_eval == 0:
            raise ValueError(
                "eval on a text source needs data.eval_fraction > 0 (held-out windows)"
            )
        lo, n = n_win - n_eval, n_eval
    else:
        lo, n = 0, n_win - n_eval
        if n < 1:
            raise ValueError(f"data.eval_fraction={cfg.eval_fraction} leaves no training windows")
    perms: dict[int, np.ndarray] = {}

    def sample(i: int) -> dict[str, np.ndarray]:
        epoch, j = divmod(i, n)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        w = lo + int(perms[epoch][j])
        return {"tokens": corpus[w * seq_len : w * seq_len + seq_len + 1]}

    return IndexedLoader(
        sample, batch_size=batch_size, rank=rank, world=world, num_workers=cfg.num_workers
    )
