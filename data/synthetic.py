"""Synthetic long-context tasks: passkey retrieval and needle-in-a-haystack (NIAH).

Why synthetic: they work offline at any length, and retrieval accuracy by length and depth is
the standard probe of long-context memory (Titans reports S-NIAH; docs/models.md). Sample `i` is a
pure function of (seed, split, i), so the stream is identical for any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from data.base import IndexedLoader
from data.tokenizers import ByteTokenizer

if TYPE_CHECKING:
    from system.config import DataConfig

_FILLER = (
    b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
_WORDS = (
    "apple",
    "river",
    "silver",
    "lantern",
    "orbit",
    "maple",
    "falcon",
    "harbor",
    "violet",
    "copper",
    "meadow",
    "quartz",
    "ember",
    "glacier",
    "pepper",
    "saffron",
)
_SPLIT_SALT = {"train": 0, "eval": 1, "test": 2}


@dataclass
class NeedleSample:
    """Tokens of one probe plus where its answer sits (for accuracy and loss masks)."""

    tokens: np.ndarray  # (length,) uint16
    answer_start: int  # index of the first answer token
    answer: str
    depth: float


def make_needle(
    rng: np.random.Generator,
    length: int,
    *,
    depth: float = -1.0,
    kind: str = "passkey",
    digits: int = 5,
    alphabet: int = 10,
) -> NeedleSample:
    """A byte-level probe of exactly `length` tokens whose last tokens are the answer.

    `depth` in [0, 1] places the needle at that fraction of the filler (negative: uniform).
    The answer's digits are drawn from '0'..str(alphabet - 1): a small alphabet makes an easier
    task (chance per digit 1 / alphabet) for a short smoke run.
    """
    if not 2 <= alphabet <= 10:
        raise ValueError(f"passkey alphabet={alphabet}; expected 2..10 digits")
    if kind == "passkey":
        answer = "".join(str(d) for d in rng.integers(0, alphabet, size=digits))
        intro = b"Find the pass key. "
        needle = f"The pass key is {answer}. Remember it. ".encode()
        question = b"What is the pass key? It is "
    elif kind == "niah":
        word = _WORDS[int(rng.integers(len(_WORDS)))]
        answer = "".join(str(d) for d in rng.integers(0, alphabet, size=digits))
        intro = b"Find the magic number. "
        needle = f"The special magic number for {word} is {answer}. ".encode()
        question = f"What is the special magic number for {word}? It is ".encode()
    else:
        raise ValueError(f"needle kind {kind!r} is unknown; expected 'passkey' or 'niah'")
    tail = question + answer.encode()
    n_fill = length - len(intro) - len(needle) - len(tail)
    if n_fill < 0:
        need = len(intro) + len(needle) + len(tail)
        raise ValueError(f"sequence length {length} is too short for a {kind} probe (>= {need})")
    d = float(rng.random()) if depth < 0 else depth
    reps = n_fill // len(_FILLER) + 1
    filler = (_FILLER * reps)[:n_fill]
    # Insert at a sentence boundary near the requested depth so the text stays readable.
    cut = int(round(d * n_fill))
    dot = filler.rfind(b". ", 0, cut)
    cut = dot + 2 if (dot >= 0 and cut - dot < 64) else cut
    text = intro + filler[:cut] + needle + filler[cut:] + tail
    assert len(text) == length
    tokens = ByteTokenizer().encode(text)
    return NeedleSample(tokens, length - len(answer), answer, d)


def answer_loss_mask(seq_len: int, digits: int, filler_weight: float) -> np.ndarray:
    """Per-target loss weights of a probe of seq_len + 1 tokens: 1 on the answer, else
    `filler_weight`.

    Why: the filler is predictable text, so an unweighted loss falls on it while the answer
    (a few tokens out of hundreds) stays at chance; weighting the answer trains retrieval.
    Target t predicts token t + 1, so the answer's last `digits` tokens are the last targets.
    """
    mask = np.full(seq_len, filler_weight, dtype=np.float32)
    mask[seq_len - digits :] = 1.0
    return mask


def passkey_sample_fn(cfg: DataConfig, *, seq_len: int, seed: int, split: str = "train"):
    """Sample function for IndexedLoader: tokens of seq_len + 1 and, when data.filler_loss_weight
    is not 1, a `loss_mask` weighting the answer over the filler."""
    kind = "niah" if cfg.source == "niah" else "passkey"
    salt = _SPLIT_SALT[split]
    digits = cfg.passkey_digits
    mask = (
        answer_loss_mask(seq_len, digits, cfg.filler_loss_weight)
        if cfg.filler_loss_weight != 1.0
        else None
    )

    def sample(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, salt, i])
        s = make_needle(
            rng,
            seq_len + 1,
            depth=cfg.depth,
            kind=kind,
            digits=digits,
            alphabet=cfg.passkey_alphabet,
        )
        out = {"tokens": s.tokens.astype(np.int64)}
        if mask is not None:
            out["loss_mask"] = mask.copy()
        return out

    return sample


def build_passkey_loader(
    cfg: DataConfig,
    *,
    seq_len: int,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    split: str = "train",
) -> IndexedLoader:
    """An endless, resumable stream of passkey / NIAH probes split across ranks."""
    fn = passkey_sample_fn(cfg, seq_len=seq_len, seed=seed, split=split)
    return IndexedLoader(
        fn, batch_size=batch_size, rank=rank, world=world, num_workers=cfg.num_workers
    )
