"""Packing: both packers against the concatenate-and-cut oracle, resume, skips, 2M tokens."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from data.packing import MAX_SEQ_LEN, DocPos, pack_documents, pack_into, reference_pack

SEP = 999


def _docs(seed: int, n: int = 40, max_len: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, max_len, size=n)
    lens[::7] = 0  # empty documents are a separator only
    return [rng.integers(0, 900, size=int(k)).astype(np.uint16) for k in lens]


def _random_access(docs: list[np.ndarray]) -> dict:
    return dict(length=lambda d: len(docs[d]), read=lambda d, lo, hi: docs[d][lo:hi], sep=SEP)


@pytest.mark.parametrize("seq_len", [1, 7, 63, 500])
def test_pack_into_matches_reference(seq_len: int) -> None:
    docs = _docs(seq_len)
    ref = reference_pack(docs, seq_len, SEP)
    assert len(ref) > 2
    pos = DocPos(0, 0)
    for i, (want_tok, want_ids) in enumerate(ref):
        tok = np.full(seq_len + 1, -1, np.int64)
        ids = np.full(seq_len, -1, np.int64)
        nxt, skipped = pack_into(tok[:seq_len], ids, pos, **_random_access(docs))
        pack_into(tok[seq_len:], ids[:0], nxt, **_random_access(docs))
        assert skipped == 0
        assert np.array_equal(tok, want_tok), f"sequence {i} tokens differ"
        assert np.array_equal(ids, want_ids), f"sequence {i} doc_ids differ"
        pos = nxt


@pytest.mark.parametrize("seq_len", [5, 64, 333])
def test_pack_documents_matches_reference_and_resumes(seq_len: int) -> None:
    docs = _docs(100 + seq_len)
    ref = reference_pack(docs, seq_len, SEP)
    got = list(pack_documents(iter(docs), seq_len, SEP))
    assert len(got) == len(ref)
    for (tok, ids, _), (want_tok, want_ids) in zip(got, ref):
        assert np.array_equal(tok, want_tok) and np.array_equal(ids, want_ids)
    # Resume from the position saved after sequence k: the rest comes out identical.
    k = len(got) // 2
    pos = got[k][2]
    resumed = list(pack_documents(iter(docs[pos.doc :]), seq_len, SEP, start=pos))
    assert len(resumed) == len(got) - k - 1
    for (tok, ids, _), (want_tok, want_ids, _) in zip(resumed, got[k + 1 :]):
        assert np.array_equal(tok, want_tok) and np.array_equal(ids, want_ids)


def test_unreadable_document_is_masked_and_counted_once() -> None:
    docs = [
        np.arange(10, dtype=np.uint16),
        np.arange(100, 130, dtype=np.uint16),
        np.arange(20, dtype=np.uint16),
    ]
    bad = 1
    kw = dict(
        length=lambda d: len(docs[d]),
        sep=SEP,
        read=lambda d, lo, hi: None if d == bad else docs[d][lo:hi],
    )
    seq_len, pos, total, masks = 16, DocPos(0, 0), 0, []
    for _ in range(3):  # doc 1 (tokens 11..40) spans sequences 0, 1 and 2
        tok = np.empty(seq_len + 1, np.int64)
        ids = np.empty(seq_len, np.int64)
        mask = np.ones(seq_len + 1, np.float32)
        nxt, skipped = pack_into(tok, ids, pos, mask_out=mask, **kw)
        pos = DocPos(*_back_one(nxt, docs))
        total += skipped
        masks.append(mask)
        assert (tok[mask == 0] == SEP).all()
    assert total == 1
    flat = np.concatenate([m[:seq_len] for m in masks])
    assert flat[:11].all() and not flat[11:41].any() and flat[41:].all()


def _back_one(pos: DocPos, docs: list[np.ndarray]) -> tuple[int, int]:
    """The position one token before `pos` (the next sequence starts at the shared token)."""
    if pos.offset > 0:
        return pos.doc, pos.offset - 1
    return pos.doc - 1, len(docs[pos.doc - 1])


def test_pack_into_without_mask_refuses_unreadable() -> None:
    tok, ids = np.empty(4, np.int64), np.empty(3, np.int64)
    with pytest.raises(ValueError, match="document 0 is unreadable"):
        pack_into(tok, ids, DocPos(0), length=lambda d: 3, read=lambda d, lo, hi: None, sep=0)


def test_seq_len_bounds() -> None:
    with pytest.raises(ValueError, match="2097152"):
        next(pack_documents([np.zeros(3, np.uint16)], MAX_SEQ_LEN + 1, SEP))
    with pytest.raises(ValueError, match="seq_len=0"):
        next(pack_documents([np.zeros(3, np.uint16)], 0, SEP))


def test_two_million_token_sequences() -> None:
    rng = np.random.default_rng(0)
    docs = [
        rng.integers(0, 256, size=n).astype(np.uint16) for n in (1_500_000, 3, 2_000_000, 700_000)
    ]
    ref = reference_pack(docs, MAX_SEQ_LEN, SEP)
    got = list(islice(pack_documents(iter(docs), MAX_SEQ_LEN, SEP), 3))
    assert len(got) == len(ref) == 2
    for (tok, ids, _), (want_tok, want_ids) in zip(got, ref):
        assert tok.shape == (MAX_SEQ_LEN + 1,) and ids.shape == (MAX_SEQ_LEN,)
        assert np.array_equal(tok, want_tok) and np.array_equal(ids, want_ids)
    # Boundaries are where doc_ids changes; the separator closes each document.
    _, ids0, _ = got[0]
    cuts = np.flatnonzero(np.diff(ids0)) + 1
    assert cuts.tolist() == [1_500_001, 1_500_005]
    assert got[0][0][1_500_000] == SEP
