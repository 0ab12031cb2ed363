"""The global order of shard samples: a function of (seed, epoch), of no rank or worker count.

Order. The global sample order of epoch e is a function of (seed, e) alone: the shards are
permuted by (seed, e) and concatenated; the resulting stream of N samples is cut into windows
of `shuffle_buffer` samples and each window is permuted by (seed, e, window). This is the
bounded shuffle: a sample moves less than one window. Epochs follow each other as one endless
stream: global sample g = e * N + position. `SampleOrder` maps g to (shard, row) for any kind
of sample; `TokenOrder` adds the token stream of token shards: it is `doc SEP doc SEP ...`
(data/packing.py), sequence i is tokens [i*L, i*L + L + 1), and `locate` maps a global token
position to (global document, offset) by binary search over shard and window token counts.

Split. Rank r of `world` takes global sequences (samples) i = r, r + world, ... in rank-local
batches (`global_index`); a loader's DataLoader workers take whole rank-local batches
round-robin (the order a DataLoader returns them). No sample is lost or repeated, and nothing
depends on world size or worker count, so a position in the global stream resumes on any.

Eval. `split="eval"` reads the held-out shards: `ceil(eval_fraction * shards)` of them, chosen
by a fixed permutation (the same for every seed), never read by `split="train"`
(`split_shards`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from data.packing import DocPos

_SHARD_SALT, _WINDOW_SALT, _EVAL_SEED = 0x5A4D, 0xB0F, 0xE7A1
_EPOCHS, _WINDOWS = 2, 8  # epochs and windows an order keeps computed

# doc_tokens(k) -> (token count per document of shard k, their prefix sums with one separator
# per document (len + 1)): the shard's table, read on demand (data/shard_reader.py caches it).
DocTokensFn = Callable[[int], tuple[np.ndarray, np.ndarray]]


def shard_permutation(seed: int, epoch: int, n_shards: int) -> np.ndarray:
    """The order in which epoch `epoch` concatenates the shards."""
    return np.random.default_rng([seed, epoch, _SHARD_SALT]).permutation(n_shards)


def window_permutation(seed: int, epoch: int, window: int, n: int) -> np.ndarray:
    """The shuffle of the `n` samples of window `window` of epoch `epoch`."""
    return np.random.default_rng([seed, epoch, window, _WINDOW_SALT]).permutation(n)


def global_index(batch: int, row: int, *, batch_size: int, rank: int, world: int) -> int:
    """Global sequence (sample) number of row `row` of rank `rank`'s rank-local batch `batch`."""
    return (batch * batch_size + row) * world + rank


def split_shards(n_shards: int, split: str, eval_fraction: float) -> list[int]:
    """Shard numbers of the train or eval split (see module docstring), in shard order.

    Every shard for train when eval_fraction <= 0; eval then has none and is refused.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
    if eval_fraction <= 0:
        if split == "eval":
            raise ValueError("eval on shards needs data.eval_fraction > 0 (held-out shards)")
        return list(range(n_shards))
    n_eval = eval_shard_count(n_shards, eval_fraction)
    if n_eval >= n_shards:
        raise ValueError(
            f"data.eval_fraction={eval_fraction} holds out {n_eval} of {n_shards} shard(s), "
            f"leaving none to train on; write more shards (a smaller --shard-size)"
        )
    held = set(np.random.default_rng(_EVAL_SEED).permutation(n_shards)[:n_eval].tolist())
    return [k for k in range(n_shards) if (k in held) == (split == "eval")]


def eval_shard_count(n_shards: int, eval_fraction: float) -> int:
    """How many of `n_shards` shards eval_fraction holds out."""
    return math.ceil(eval_fraction * n_shards)


@dataclass
class Window:
    shard: np.ndarray  # per sample in shuffled order: shard number
    local: np.ndarray  # ... row in that shard


@dataclass
class TokenWindow(Window):
    tok_start: int  # epoch-relative token position of the window's first document
    ntok: np.ndarray  # per document in shuffled order: token count (without the separator)
    cum: np.ndarray  # token offsets of the documents in the window (len + 1)


class SampleOrder:
    """Global sample g -> (shard, row in it) of shards holding `samples[k]` samples each.

    Computed epochs and windows are cached; the object is cheap to rebuild (counts only).
    """

    def __init__(self, samples: Sequence[int], *, seed: int, shuffle_buffer: int) -> None:
        self.seed, self.buffer = seed, max(1, int(shuffle_buffer))
        self._samples = np.array(samples, dtype=np.int64)
        self.num_samples = int(self._samples.sum())
        self._epochs: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], Window] = OrderedDict()

    def epoch(self, e: int) -> tuple[np.ndarray, ...]:
        """(shard permutation, sample prefix, ...) of epoch e, in permuted order."""
        hit = self._epochs.get(e)
        if hit is None:
            hit = self._epochs[e] = self._new_epoch(e)
            while len(self._epochs) > _EPOCHS:
                self._epochs.popitem(last=False)
        return hit

    def _new_epoch(self, e: int) -> tuple[np.ndarray, ...]:
        perm = shard_permutation(self.seed, e, len(self._samples))
        return perm, np.concatenate([[0], np.cumsum(self._samples[perm])])

    def window(self, e: int, w: int) -> Window:
        """Window w of epoch e: its samples' shards and rows, shuffled."""
        win = self._windows.get((e, w))
        if win is not None:
            return win
        win = self._windows[(e, w)] = self._new_window(e, w)
        while len(self._windows) > _WINDOWS:
            self._windows.popitem(last=False)
        return win

    def _span(self, e: int, w: int) -> tuple[int, int, int]:
        """Window w's samples [a, b) and the position in epoch e's order of a's shard."""
        cum = self.epoch(e)[1]
        a, b = w * self.buffer, min(self.num_samples, (w + 1) * self.buffer)
        return a, b, int(np.searchsorted(cum, a, side="right")) - 1

    def _pieces(self, e: int, a: int, b: int, k: int) -> list[tuple[int, int, int]]:
        """(shard, first row, end row) of samples [a, b) of epoch e, from shard perm[k] on."""
        perm, cum = self.epoch(e)[:2]
        out, pos = [], a
        while pos < b:
            sk = int(perm[k])
            lo, hi = pos - int(cum[k]), min(int(self._samples[sk]), b - int(cum[k]))
            if hi > lo:
                out.append((sk, lo, hi))
                pos += hi - lo
            k += 1
        return out

    def _new_window(self, e: int, w: int) -> Window:
        a, b, k = self._span(e, w)
        pieces = self._pieces(e, a, b, k)
        order = window_permutation(self.seed, e, w, b - a)
        shard = np.concatenate([np.full(hi - lo, sk, dtype=np.int64) for sk, lo, hi in pieces])
        local = np.concatenate([np.arange(lo, hi, dtype=np.int64) for _, lo, hi in pieces])
        return Window(shard[order], local[order])

    def find(self, g: int) -> tuple[Window, int]:
        """Global sample g -> (its window, its place in the window)."""
        e, p = divmod(g, self.num_samples)
        w, j = divmod(p, self.buffer)
        return self.window(e, w), j

    def sample(self, g: int) -> tuple[int, int]:
        """Global sample g -> (shard number, row in that shard)."""
        win, j = self.find(g)
        return int(win.shard[j]), int(win.local[j])


class TokenOrder(SampleOrder):
    """The order of token shards' documents, and their packed token stream (`locate`).

    `tokens[k]` is shard k's token count (without separators); `doc_tokens(k)` its documents'
    counts and prefix sums, asked for only for the shards a position or window touches.
    """

    def __init__(
        self,
        samples: Sequence[int],
        tokens: Sequence[int],
        *,
        seed: int,
        shuffle_buffer: int,
        doc_tokens: DocTokensFn,
    ) -> None:
        super().__init__(samples, seed=seed, shuffle_buffer=shuffle_buffer)
        self._tokens = np.array(tokens, dtype=np.int64)
        self.epoch_tokens = int(self._tokens.sum()) + self.num_samples  # a separator per doc
        self._doc_tokens = doc_tokens

    def _new_epoch(self, e: int) -> tuple[np.ndarray, ...]:
        """(shard permutation, doc prefix, token prefix) of epoch e, in permuted order."""
        perm, cum_docs = super()._new_epoch(e)
        cum_toks = np.concatenate([[0], np.cumsum(self._tokens[perm] + self._samples[perm])])
        return perm, cum_docs, cum_toks

    def _new_window(self, e: int, w: int) -> TokenWindow:
        perm, cum_docs, cum_toks = self.epoch(e)
        a, b, k = self._span(e, w)
        _, prefix = self._doc_tokens(int(perm[k]))
        tok_start = int(cum_toks[k] + prefix[a - cum_docs[k]])
        pieces = self._pieces(e, a, b, k)
        shard = [np.full(hi - lo, sk, dtype=np.int64) for sk, lo, hi in pieces]
        local = [np.arange(lo, hi, dtype=np.int64) for _, lo, hi in pieces]
        ntok = [self._doc_tokens(sk)[0][lo:hi] for sk, lo, hi in pieces]
        order = window_permutation(self.seed, e, w, b - a)
        sh, lc, nt = (np.concatenate(x)[order] for x in (shard, local, ntok))
        cum = np.zeros(b - a + 1, dtype=np.int64)
        np.cumsum(nt + 1, out=cum[1:])
        return TokenWindow(sh, lc, tok_start, nt, cum)

    def locate(self, t: int) -> DocPos:
        """Global token position -> (global document, offset into it)."""
        e, u = divmod(t, self.epoch_tokens)
        perm, cum_docs, cum_toks = self.epoch(e)
        # Windows cover the same tokens shuffled or not: find u's window in shard order.
        k = int(np.searchsorted(cum_toks, u, side="right")) - 1
        _, prefix = self._doc_tokens(int(perm[k]))
        s = int(cum_docs[k]) + int(np.searchsorted(prefix, u - cum_toks[k], side="right")) - 1
        w = s // self.buffer
        win = cast(TokenWindow, self.window(e, w))
        v = u - win.tok_start
        j = int(np.searchsorted(win.cum, v, side="right")) - 1
        return DocPos(e * self.num_samples + w * self.buffer + j, int(v - win.cum[j]))

    def length(self, g: int) -> int:
        """Tokens of global document g (without its separator)."""
        win, j = self.find(g)
        return int(cast(TokenWindow, win).ntok[j])
