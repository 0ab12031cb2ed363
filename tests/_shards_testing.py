"""Helpers of the shard tests: small datasets of known content and the exactly-once check."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np

from data.convert.text import convert_text
from data.shard_loader import ShardLoader
from data.shard_reader import ShardSource


def make_docs(n: int, seed: int = 0, max_len: int = 600) -> list[bytes]:
    """`n` documents of random lengths, each starting with its own number."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        body = rng.integers(97, 123, size=int(rng.integers(0, max_len))).astype(np.uint8)
        out.append(f"<{k}>".encode() + body.tobytes())
    return out


def write_dataset(root: Path, docs: list[bytes], *, shard_size: str = "4KB") -> Path:
    """One text file per document (sorted = document order), converted to shards."""
    src = root / "src"
    src.mkdir(parents=True)
    for k, d in enumerate(docs):
        (src / f"doc{k:05d}.txt").write_bytes(d)
    out = root / "shards"
    convert_text([str(src)], out, shard_size=shard_size, progress=False)
    return out


def read_rows(loader: ShardLoader, n_batches: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(global token start, tokens (L+1,), doc_ids (L,)) of each row of the next batches."""
    start, bsz, world, rank, L = (
        loader.token,
        loader.batch_size,
        loader.world,
        loader.rank,
        loader.seq_len,
    )
    rows = []
    for b, batch in enumerate(islice(loader, n_batches)):
        assert batch["tokens"].shape == (bsz, L + 1), batch["tokens"].shape
        assert batch["doc_ids"].shape == (bsz, L), batch["doc_ids"].shape
        for j in range(bsz):
            g = (b * bsz + j) * world + rank
            rows.append((start + g * L, batch["tokens"][j].numpy(), batch["doc_ids"][j].numpy()))
    return rows


def check_epoch_once(rows: list, source: ShardSource, docs: list[bytes]) -> None:
    """The rows tile the stream from token 0 without gap or overlap, and epoch 0 is every
    document exactly once, each intact and followed by the separator."""
    rows = sorted(rows, key=lambda r: r[0])
    L = len(rows[0][2])
    starts = [r[0] for r in rows]
    assert starts == [i * L for i in range(len(rows))], "sequences missing or repeated"
    for a, b in zip(rows, rows[1:]):
        assert a[1][L] == b[1][0], f"target of the sequence at token {a[0]} is not the next input"
    tokens = np.concatenate([r[1][:L] for r in rows])
    ids = np.concatenate([r[2] for r in rows])
    n, e = source.num_docs, source.epoch_tokens
    assert len(tokens) >= e, f"read {len(tokens)} tokens, fewer than one epoch ({e})"
    tokens, ids = tokens[:e], ids[:e]
    assert (np.diff(ids) >= 0).all() and ids[0] == 0 and ids[-1] == n - 1
    bounds = np.searchsorted(ids, np.arange(n + 1))
    keys = set()
    for g in range(n):
        key = source.doc_key(g)[1]
        keys.add(key)
        want = np.append(np.frombuffer(docs[int(key)], np.uint8).astype(np.int64), source.sep_id)
        got = tokens[bounds[g] : bounds[g + 1]]
        assert np.array_equal(got, want), f"document {g} (key {key}) is not read intact"
    assert keys == {f"{k:010d}" for k in range(len(docs))}, "some documents were never read"


def member_of(path: Path, shard: int, row: int) -> tuple[Path, str, int, int, int]:
    """(shard file, key, member offset, token bytes offset, tokens) of one sidecar row."""
    table = np.load(path / f"shard-{shard:06d}.idx.npy", allow_pickle=False)
    r = table[row]
    return (
        path / f"shard-{shard:06d}.tar",
        r["key"].decode(),
        int(r["member"]),
        int(r["data"]),
        int(r["ntok"]),
    )


def flip_payload(shard: Path, data: int, tok: int) -> None:
    """Flip the low bit of token `tok` of the member whose tokens start at byte `data`: the id
    stays in the byte vocabulary, so only a checksum can tell."""
    with open(shard, "r+b") as f:
        f.seek(data + 2 * tok)
        b = f.read(1)[0]
        f.seek(data + 2 * tok)
        f.write(bytes([b ^ 1]))
