"""Random access to the packed token stream of shards: `ShardSource` (locate, length, read).

Efficiency. A rank never reads, let alone decodes, documents of other ranks: per-shard
sidecars (data/shard_format.py) give every document's byte offset and length, so locating
sequence i is a binary search over shard and window token counts (data/shard_order.py), and
reading it is one ranged read per document slice (os.pread locally, fsspec range reads
remotely) of exactly the tokens that land in the sequence, after checking the member's tar and
.npy headers. The price is scattered reads of every shard by every rank instead of whole
shards per rank; with documents of more than a few KB this stays at the disk's or object
store's bandwidth. `pipe:` URLs cannot seek, so each process spools the shards it touches (use
fsspec URLs for object stores).

Bad data. `on_error="raise"` stops at the first unreadable document with the shard and key
named; with `"skip"` `read` returns None for it (the packer masks its span out of the loss, so
the layout stays identical on every rank) and keeps (shard, key, reason) for the loader to
name (`take_skip_reasons`; data/shard_loader.py counts and names them).

Checksums. Datasets of index version 2 carry a crc32 per 4 KB chunk of every document's
tokens (data/shard_format.py). A read verifies the chunks its slice touches (a mismatch is bad
data, as above). With `on_error="skip"` the document's first slice verifies the whole
document, so a damaged document is masked from its start and counted once wherever the damage
is (that re-reads long documents once more). Version-1 datasets and shard patterns have no
checksums and are read unverified.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np

from data.packing import DocPos
from data.shard_format import (
    CHUNK_BYTES,
    CRC_DTYPE,
    TABLE_DTYPE,
    TOKENS_EXT,
    ShardDataError,
    check_tar_header,
    parse_npy_header,
    scan_shard,
)
from data.shard_index import Shard, expand_urls, is_shard_pattern, read_index, scan_shards
from data.shard_order import TokenOrder, split_shards
from data.shard_urls import RangeReader, read_url
from data.tokenizers import load_tokenizer

_BLOCK = 512
_VERIFY_BLOCK = 8 << 20  # a long document's first slice verifies the rest in reads this size
_TABLES = 64  # shard tables (and checksum files) a source keeps loaded


class _Tables:
    """Per-shard document tables (sidecar, pinned or scanned), loaded on demand, LRU-cached."""

    def __init__(
        self, shards: list[Shard], pinned: dict[int, np.ndarray], files: RangeReader
    ) -> None:
        self.shards, self._pinned, self._files = shards, pinned, files
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard k's per-document table and its token prefix sums (with separators)."""
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        s = self.shards[k]
        if k in self._pinned:
            table = self._pinned[k]
        elif s.sidecar is not None:
            table = np.load(io.BytesIO(read_url(s.sidecar)), allow_pickle=False)
            if table.dtype != TABLE_DTYPE:
                raise ShardDataError(
                    s.url,
                    None,
                    f"sidecar {s.sidecar} has fields {table.dtype}; expected {TABLE_DTYPE}",
                )
        else:
            table, _ = scan_shard(s.url, self._files)
        if len(table) != s.samples or int(table["ntok"].sum()) != s.tokens:
            raise ShardDataError(
                s.url,
                None,
                f"index.json lists {s.samples} samples / {s.tokens} tokens but the "
                f"shard's table has {len(table)} / {int(table['ntok'].sum())}; rewrite the dataset",
            )
        prefix = np.zeros(len(table) + 1, dtype=np.int64)
        np.cumsum(table["ntok"] + 1, out=prefix[1:])
        self._cache[k] = (table, prefix)
        while len(self._cache) > _TABLES:
            self._cache.popitem(last=False)
        return table, prefix

    def doc_tokens(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard k's token count per document and their prefix sums (for the order)."""
        table, prefix = self.get(k)
        return table["ntok"], prefix


class ShardSource:
    """Random access to the packed global stream: `locate`, `length`, `read` (picklable)."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        dtype: np.dtype,
        sep_id: int,
        vocab_size: int | None,
        seed: int,
        shuffle_buffer: int,
        on_error: str = "raise",
        tables: dict[int, np.ndarray] | None = None,
        verify: bool = True,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'skip'")
        self.shards = shards
        self.dtype, self.sep_id, self.vocab_size = np.dtype(dtype), sep_id, vocab_size
        self.seed, self.buffer, self.on_error = seed, max(1, int(shuffle_buffer)), on_error
        self.num_docs = int(sum(s.samples for s in shards))
        if self.num_docs == 0:
            names = ", ".join(s.url for s in shards[:3]) + (", ..." if len(shards) > 3 else "")
            raise ValueError(
                f"the {len(shards)} shard(s) ({names or 'none'}) hold no documents; expected at "
                "least one"
            )
        # Verify only where every shard has checksums (index version 2).
        self.verify = bool(verify) and all(s.checksums is not None for s in shards)
        self.chunk_bytes = int(chunk_bytes)
        self._pinned = dict(tables or {})  # scanned tables travel with the object to workers
        self._reset_caches()
        self.epoch_tokens = self._order.epoch_tokens  # one separator per doc

    def _reset_caches(self) -> None:
        self._files = RangeReader()
        self._tables = _Tables(self.shards, self._pinned, self._files)
        self._order = TokenOrder(
            [s.samples for s in self.shards],
            [s.tokens for s in self.shards],
            seed=self.seed,
            shuffle_buffer=self.buffer,
            doc_tokens=self._tables.doc_tokens,
        )
        self._crcs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._why: dict[int, tuple[str, str, str]] = {}  # skipped doc -> (shard, key, reason)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in ("_files", "_tables", "_order", "_crcs", "_why"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        *,
        seed: int,
        shuffle_buffer: int = 1000,
        on_error: str = "raise",
        tokenizer: str = "byte",
        verify: bool = True,
    ) -> ShardSource:
        """A dataset directory / index.json URL, or a shard pattern (then headers are scanned).

        `verify=False` skips the checksums (benchmarks; datasets without them never verify).
        """
        if is_shard_pattern(path):
            return cls._from_urls(
                expand_urls(path),
                seed=seed,
                shuffle_buffer=shuffle_buffer,
                on_error=on_error,
                tokenizer=tokenizer,
                where=path,
            )
        index = read_index(path)
        return cls(
            index.shards,
            dtype=index.dtype,
            sep_id=index.sep_id,
            vocab_size=index.vocab_size,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            on_error=on_error,
            verify=verify,
            chunk_bytes=index.chunk_bytes,
        )

    @classmethod
    def _from_urls(cls, urls: list[str], *, tokenizer: str, where: str, **kw: Any) -> ShardSource:
        shards, tables, dtype = scan_shards(urls, where=where)
        tok = load_tokenizer(tokenizer)
        return cls(
            shards,
            dtype=dtype,
            sep_id=tok.sep_id,
            vocab_size=tok.vocab_size,
            tables=tables,
            **kw,
        )

    def split(self, split: str, eval_fraction: float) -> ShardSource:
        """The train or eval share of the shards (held-out shards; data/shard_order.py)."""
        keep = split_shards(len(self.shards), split, eval_fraction)
        if len(keep) == len(self.shards):  # eval_fraction <= 0: train reads every shard
            return self
        return ShardSource(
            [self.shards[k] for k in keep],
            dtype=self.dtype,
            sep_id=self.sep_id,
            vocab_size=self.vocab_size,
            seed=self.seed,
            shuffle_buffer=self.buffer,
            on_error=self.on_error,
            tables={i: self._pinned[k] for i, k in enumerate(keep) if k in self._pinned},
            verify=self.verify,
            chunk_bytes=self.chunk_bytes,
        )

    def fingerprint(self) -> str:
        """Identifies the dataset (names and counts, not its location) for resume checks."""
        desc = [(s.url.rsplit("/", 1)[-1], s.samples, s.tokens) for s in self.shards]
        return hashlib.sha1(json.dumps(desc).encode()).hexdigest()[:16]

    # -- layout ----------------------------------------------------------------------------

    def _checks(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard k's chunk crc32s and, per document, the index of its first chunk (len + 1)."""
        hit = self._crcs.get(k)
        if hit is not None:
            self._crcs.move_to_end(k)
            return hit
        s, (table, _) = self.shards[k], self._tables.get(k)
        assert s.checksums is not None
        crcs = np.load(io.BytesIO(read_url(s.checksums)), allow_pickle=False)
        nbytes = table["ntok"].astype(np.int64) * self.dtype.itemsize
        starts = np.zeros(len(table) + 1, dtype=np.int64)
        np.cumsum(-(-nbytes // self.chunk_bytes), out=starts[1:])
        if crcs.dtype != CRC_DTYPE or crcs.shape != (int(starts[-1]),):
            raise ShardDataError(
                s.url,
                None,
                f"checksum file {s.checksums} holds {crcs.dtype} {crcs.shape}; expected "
                f"{CRC_DTYPE} ({int(starts[-1])},) (one per {self.chunk_bytes}-byte chunk); "
                "rewrite the dataset",
            )
        self._crcs[k] = (crcs, starts)
        while len(self._crcs) > _TABLES:
            self._crcs.popitem(last=False)
        return crcs, starts

    def locate(self, t: int) -> DocPos:
        """Global token position -> (global document, offset into it)."""
        return self._order.locate(t)

    def length(self, g: int) -> int:
        return self._order.length(g)

    def doc_key(self, g: int) -> tuple[str, str]:
        """(shard URL, sample key) of global document g."""
        k, i = self._order.sample(g)
        table, _ = self._tables.get(k)
        return self.shards[k].url, table["key"][i].decode()

    # -- reading ---------------------------------------------------------------------------

    def read(self, g: int, lo: int, hi: int) -> np.ndarray | None:
        """Tokens [lo, hi) of document g; None if it is bad and on_error is 'skip'."""
        k, i = self._order.sample(g)
        try:
            return self._read(k, i, lo, hi)
        except ShardDataError as err:
            if self.on_error == "raise":
                raise ShardDataError(
                    err.url,
                    err.key,
                    err.what + "; set data.on_error=skip to skip (and count) bad samples",
                ) from None
            self._why[g] = (err.url, err.key or "", err.what)
            return None

    def take_skip_reasons(self) -> dict[int, tuple[str, str, str]]:
        """(shard, key, reason) of the documents `read` skipped since the last call."""
        why, self._why = self._why, {}
        return why

    def _read(self, k: int, i: int, lo: int, hi: int) -> np.ndarray:
        table, _ = self._tables.get(k)
        url, row = self.shards[k].url, table[i]
        key = row["key"].decode(errors="replace")
        member, data, ntok = int(row["member"]), int(row["data"]), int(row["ntok"])
        isz, head = self.dtype.itemsize, data - member
        nbytes = ntok * isz
        if data + nbytes > self._files.size(url):  # the same verdict for every slice
            raise ShardDataError(
                url,
                key,
                f"the shard ends before byte {data + nbytes} of this member (truncated shard)",
            )
        # Bytes [ra, rb) of the member's tokens are read: the slice [a, b), widened to whole
        # checksum chunks when verifying. With on_error=skip the document's first slice
        # verifies all of it, so a damaged document is counted once (at its start); with
        # raise, each slice verifying its own chunks finds every damage on its own.
        whole = self.verify and lo == 0 and self.on_error == "skip"
        a, b = lo * isz, hi * isz
        if self.verify:
            crcs, starts = self._checks(k)
            crcs = crcs[starts[i] : starts[i + 1]]
            c = self.chunk_bytes
            ra, rb = a // c * c, min(-(-b // c) * c, nbytes)
            if whole:
                rb = max(rb, min(nbytes, _VERIFY_BLOCK))
        else:
            ra, rb = a, b
        end = nbytes if whole else rb  # bytes verified, not all returned
        if ra == 0:  # one read: headers and the slice are contiguous
            buf = self._files.pread(url, member, head + rb)
            hdr, body = buf[:head], buf[head:]
        else:
            hdr = self._files.pread(url, member, head)
            body = self._files.pread(url, data + ra, rb - ra) if len(hdr) == head else b""
        if len(hdr) < head or len(body) < rb - ra:
            raise ShardDataError(
                url,
                key,
                f"the shard ends before byte {data + rb} of this member (truncated shard)",
            )
        name = f"{key}.{TOKENS_EXT}"
        try:
            dtype, shape, hlen = parse_npy_header(hdr[_BLOCK:])
        except ValueError as e:
            bad = check_tar_header(hdr[:_BLOCK], name) or str(e)
        else:
            if dtype != self.dtype:
                bad = f"tokens.npy has dtype {dtype}; expected {self.dtype}"
            elif shape != (ntok,) or hlen != head - _BLOCK:
                bad = f"tokens.npy has shape {shape}; the index says ({ntok},)"
            else:
                bad = check_tar_header(hdr[:_BLOCK], name, head - _BLOCK + ntok * isz)
        if bad is not None:
            raise ShardDataError(url, key, bad)
        if self.verify:
            self._verify(url, key, body, ra, crcs)
            pos = rb
            while pos < end:  # the rest of a long document, read and dropped
                more = self._files.pread(url, data + pos, min(_VERIFY_BLOCK, end - pos))
                if not more:
                    raise ShardDataError(
                        url, key, f"the shard ends before byte {data + pos} (truncated shard)"
                    )
                self._verify(url, key, more, pos, crcs)
                self._check_vocab(url, key, np.frombuffer(more, dtype=self.dtype))
                pos += len(more)
        arr = np.frombuffer(body, dtype=self.dtype)
        self._check_vocab(url, key, arr)
        return arr[(a - ra) // isz : (b - ra) // isz]

    def _verify(self, url: str, key: str, buf: bytes, at: int, crcs: np.ndarray) -> None:
        """Check the crc32 of each chunk of `buf` (token bytes from `at`, chunk-aligned)."""
        c, mv = self.chunk_bytes, memoryview(buf)
        j0 = at // c
        got = [zlib.crc32(mv[p : p + c]) for p in range(0, len(mv), c)]
        want = crcs[j0 : j0 + len(got)].tolist()  # lists: cheaper than numpy for a few
        if got != want:
            j = next(j for j, g in enumerate(got) if j >= len(want) or g != want[j])
            w = f"{want[j]:08x}" if j < len(want) else "(none)"
            lo, hi = at + j * c, at + min((j + 1) * c, len(mv))
            raise ShardDataError(
                url,
                key,
                f"checksum mismatch in token bytes {lo}..{hi}: crc32 expected {w}, "
                f"got {got[j]:08x} (corrupt data)",
            )

    def _check_vocab(self, url: str, key: str, arr: np.ndarray) -> None:
        if self.vocab_size is not None and len(arr) and int(arr.max()) >= self.vocab_size:
            raise ShardDataError(
                url,
                key,
                f"token id {int(arr.max())} >= vocab_size {self.vocab_size} (corrupt data?)",
            )
