"""Pack documents into fixed-length training sequences with document-boundary ids.

Layout: the document stream is `doc_0 SEP doc_1 SEP ...` (the separator closes each document
and belongs to it). Sequence i is stream tokens `[i * L, i * L + L + 1)`: L inputs plus the
shifted target, overlapping the next sequence by one token, so every stream token is an input
exactly once. `doc_ids[t]` is the global index of the document that input t belongs to, so a
model can rebuild boundaries (segment masks, cu_seqlens) without parsing separators.

A position in the stream is `DocPos(doc, offset)`: the global document index and the offset
into it (offset == len(doc) is its separator). It is the whole packer state, so a packed stream
resumes exactly from it. Two packers share the layout: `pack_into` fills one sequence from
random-access documents (the shard reader, whose lengths are known), `pack_documents` walks an
in-order iterator (sources that only stream). `reference_pack` is the obvious, slow oracle.

Memory: `pack_into` writes straight into the caller's output buffer and reads only the slice
of each document that lands in it, so one worker holds one sequence, never a whole document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

MAX_SEQ_LEN = 2_097_152  # 2M tokens: the longest context a recipe packs


@dataclass(frozen=True)
class DocPos:
    """A position in the packed stream: global document index and token offset into it."""

    doc: int
    offset: int = 0


# read(doc, lo, hi) -> tokens [lo, hi) of `doc`, or None when the document is unreadable and
# the caller chose to skip it (its span is then masked out of the loss).
ReadFn = Callable[[int, int, int], "np.ndarray | None"]
LengthFn = Callable[[int], int]


def check_seq_len(seq_len: int) -> None:
    """Reject lengths the packer cannot honour, naming the bound."""
    if not (1 <= seq_len <= MAX_SEQ_LEN):
        raise ValueError(f"seq_len={seq_len} is out of range; expected 1..{MAX_SEQ_LEN}")


def pack_into(
    tokens_out: np.ndarray,
    ids_out: np.ndarray,
    start: DocPos,
    *,
    length: LengthFn,
    read: ReadFn,
    sep: int,
    mask_out: np.ndarray | None = None,
    id_base: int = 0,
    skipped_docs: list[int] | None = None,
) -> tuple[DocPos, int]:
    """Fill `tokens_out` (n,) from the stream at `start`; return the position after it.

    `ids_out` (m <= n,) receives the document id (minus `id_base`, so a narrow dtype can hold
    it) of the first m positions (the inputs).
    Tokens of documents `read` reports as unreadable are written as `sep` and get 0 in
    `mask_out` (n,) (which must then be given; it is left alone elsewhere). Returns
    (position, skipped documents that *start* in the first m positions), so a skip is counted
    once even when the document spans sequences; `skipped_docs` receives their ids, so the
    caller can name them.
    """
    n, m = len(tokens_out), len(ids_out)
    i = 0
    doc, off = start.doc, start.offset
    skipped = 0
    while i < n:
        ln = length(doc)
        if off > ln:
            raise ValueError(f"DocPos({doc}, {off}) is past document {doc} of length {ln}")
        take = min(ln - off, n - i)
        if take > 0:
            chunk = read(doc, off, off + take)
            if chunk is None:
                if mask_out is None:
                    raise ValueError(f"document {doc} is unreadable and no mask_out was given")
                tokens_out[i : i + take] = sep
                mask_out[i : i + take] = 0
                if off == 0 and i < m:
                    skipped += 1
                    if skipped_docs is not None:
                        skipped_docs.append(doc)
            else:
                if len(chunk) != take:
                    raise ValueError(f"document {doc}: read {len(chunk)} tokens, expected {take}")
                tokens_out[i : i + take] = chunk
            if i < m:
                ids_out[i : min(i + take, m)] = doc - id_base
            i += take
            off += take
        if i < n and off == ln:
            tokens_out[i] = sep
            if i < m:
                ids_out[i] = doc - id_base
            i += 1
            off += 1
        if off == ln + 1:
            doc, off = doc + 1, 0
    return DocPos(doc, off), skipped


class _InOrderDocs:
    """Random access over an in-order iterator, keeping only documents not yet passed."""

    def __init__(self, docs: Iterable[np.ndarray], first: int) -> None:
        self._it = iter(docs)
        self._next = first
        self._live: dict[int, np.ndarray] = {}

    def get(self, d: int) -> np.ndarray:
        for k in [k for k in self._live if k < d]:
            del self._live[k]  # positions only move forward
        while d >= self._next:
            try:
                self._live[self._next] = np.asarray(next(self._it))
            except StopIteration:
                raise EOFError from None
            self._next += 1
        return self._live[d]


def pack_documents(
    docs: Iterable[np.ndarray],
    seq_len: int,
    sep: int,
    start: DocPos = DocPos(0, 0),
) -> Iterator[tuple[np.ndarray, np.ndarray, DocPos]]:
    """Sequences (tokens (L+1,) int64, doc_ids (L,) int64, next position) from in-order docs.

    `docs` yields documents `start.doc, start.doc + 1, ...`; the first is entered at
    `start.offset`. The yielded position is where the *next* sequence starts, i.e. the state
    to save after consuming this one. Holds one output sequence and the documents it touches.
    Stops when the documents run out before a full sequence.
    """
    check_seq_len(seq_len)
    src = _InOrderDocs(docs, start.doc)
    kw = dict(length=lambda d: len(src.get(d)), read=lambda d, lo, hi: src.get(d)[lo:hi], sep=sep)
    pos = start
    while True:
        tokens = np.empty(seq_len + 1, dtype=np.int64)
        ids = np.empty(seq_len, dtype=np.int64)
        try:
            nxt, _ = pack_into(tokens[:seq_len], ids, pos, **kw)
            # The final target is the next sequence's first token: peek without advancing.
            pack_into(tokens[seq_len:], ids[:0], nxt, **kw)
        except EOFError:
            return
        yield tokens, ids, nxt
        pos = nxt


def reference_pack(
    docs: list[np.ndarray], seq_len: int, sep: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Oracle: concatenate everything, then cut stride-L windows of L + 1 tokens."""
    stream = np.concatenate([np.append(np.asarray(d, np.int64), sep) for d in docs])
    ids = np.concatenate([np.full(len(d) + 1, k, np.int64) for k, d in enumerate(docs)])
    n_seq = (len(stream) - 1) // seq_len
    return [
        (stream[i * seq_len : i * seq_len + seq_len + 1], ids[i * seq_len : (i + 1) * seq_len])
        for i in range(n_seq)
    ]
