"""Token shards as a deterministic, resumable, world-size-free stream of packed sequences.

Order. The global document order of epoch e is a function of (seed, e) alone: the shards are
permuted by (seed, e) and concatenated; the resulting stream of N documents is cut into
windows of `shuffle_buffer` documents and each window is permuted by (seed, e, window). This
is the bounded shuffle: a document moves less than one window. Epochs follow each other as one
endless stream: global document g = e * N + position; the packed token stream is
`doc SEP doc SEP ...` (data/packing.py) and sequence i is tokens [i*L, i*L + L + 1).

Split. Rank r of `world` takes global sequences i = r, r + world, ...; its DataLoader workers
take whole rank-local batches round-robin (the order a DataLoader returns them). No sample is
lost or repeated, and nothing depends on world size or worker count. Workers are forked (they
run numpy and file reads only) and send int32 tokens, widened to int64 on arrival.

Resume. `state_dict()` is the global token position T of the next unread sequence (identical
on every rank after a lockstep step; also given as epoch, document, offset). Any world size,
worker count, batch size or seq_len resumes from T.

Efficiency. A rank never reads, let alone decodes, documents of other ranks: per-shard
sidecars (data/shard_format.py) give every document's byte offset and length, so locating
sequence i is a binary search over shard and window token counts, and reading it is one ranged
read per document slice (os.pread locally, fsspec range reads remotely) of exactly the tokens
that land in the sequence, after checking the member's tar and .npy headers. The price is
scattered reads of every shard by every rank instead of whole shards per rank; with documents
of more than a few KB this stays at the disk's or object store's bandwidth. `pipe:` URLs cannot
seek, so each process spools the shards it touches (use fsspec URLs for object stores).
Shards without sidecars (made by other tools: `data.path` a shard pattern) are indexed once at
start by walking their tar headers.

Bad data. `on_error="raise"` stops at the first unreadable document with the shard and key
named; `"skip"` masks its span out of the loss (the layout stays identical on every rank),
counts it once in `info.skipped_samples` and names the first 10 per loader (shard, key,
reason) in `info.skipped_examples` and in a warning on the `data.shards` logger.

Checksums. Datasets of index version 2 carry a crc32 per 4 KB chunk of every document's
tokens (data/shard_format.py). A read verifies the chunks its slice touches (a mismatch is bad
data, as above). With `on_error="skip"` the document's first slice verifies the whole
document, so a damaged document is masked from its start and counted once wherever the damage
is (that re-reads long documents once more). Version-1 datasets and shard patterns have no
checksums and are read unverified.

Eval. `split="eval"` reads the held-out shards: `ceil(eval_fraction * shards)` of them, chosen
by a fixed permutation (the same for every seed), never read by `split="train"`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data.base import LoaderInfo
from data.packing import DocPos, check_seq_len, pack_into
from data.shard_format import (
    CHUNK_BYTES,
    CRC_DTYPE,
    FORMAT,
    INDEX_NAME,
    INDEX_VERSION,
    TABLE_DTYPE,
    TOKENS_EXT,
    RangeReader,
    ShardDataError,
    check_tar_header,
    parse_npy_header,
    read_url,
    scan_shard,
    sibling_url,
    url_exists,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from system.config import DataConfig

_SHARD_SALT, _WINDOW_SALT, _EVAL_SEED = 0x5A4D, 0xB0F, 0xE7A1
_BLOCK = 512
_NAMED_SKIPS = 10  # skipped samples a loader names (log + info.skipped_examples); then counts
_VERIFY_BLOCK = 8 << 20  # a long document's first slice verifies the rest in reads this size
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str
    sidecar: str | None  # URL of its .idx.npy, None: walk the tar headers
    samples: int
    tokens: int
    checksums: str | None = None  # URL of its .crc.npy (index version 2), None: not verified


@dataclass
class _Window:
    tok_start: int  # epoch-relative token position of the window's first document
    shard: np.ndarray  # per document in shuffled order: shard number
    local: np.ndarray  # ... row in that shard's table
    ntok: np.ndarray  # ... token count (without the separator)
    cum: np.ndarray  # token offsets of the documents in the window (len + 1)


def expand_urls(spec: str) -> list[str]:
    """`a.tar,b.tar` and brace patterns `shard-{000000..000009}.tar` -> list of URLs."""
    import braceexpand

    return [u for part in spec.split(",") if part for u in braceexpand.braceexpand(part)]


def index_url(path: str) -> str:
    """index.json of a dataset given as a directory, a directory URL or the index itself."""
    if path.endswith(".json") or INDEX_NAME in path:
        return path
    return path.rstrip("/") + "/" + INDEX_NAME


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
        self._samples = np.array([s.samples for s in shards], dtype=np.int64)
        self._tokens = np.array([s.tokens for s in shards], dtype=np.int64)
        self.num_docs = int(self._samples.sum())
        self.epoch_tokens = int(self._tokens.sum()) + self.num_docs  # one separator per doc
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

    def _reset_caches(self) -> None:
        self._tables: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._epochs: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], _Window] = OrderedDict()
        self._crcs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._files = RangeReader()
        self._why: dict[int, tuple[str, str, str]] = {}  # skipped doc -> (shard, key, reason)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in ("_tables", "_epochs", "_windows", "_crcs", "_files", "_why"):
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
        if ".tar" in path and not path.endswith(".json"):
            return cls._from_urls(
                expand_urls(path),
                seed=seed,
                shuffle_buffer=shuffle_buffer,
                on_error=on_error,
                tokenizer=tokenizer,
                where=path,
            )
        url = index_url(path)
        if not url_exists(url):
            raise FileNotFoundError(
                f"data.path={path!r}: no {INDEX_NAME} at {url}; expected a directory written by "
                f"`mnemo data text` or a shard pattern like DIR/shard-{{000000..000009}}.tar"
            )
        meta = json.loads(read_url(url))
        if meta.get("format") != FORMAT or meta.get("kind", "tokens") != "tokens":
            raise ValueError(
                f"{url}: format={meta.get('format')!r} kind={meta.get('kind')!r}; expected a "
                f"{FORMAT!r} token dataset"
            )
        version = meta.get("version", 1)
        if version not in (1, INDEX_VERSION):
            raise ValueError(
                f"{url}: index version {version!r}; expected 1 or {INDEX_VERSION} (written by a "
                "newer Mnemosyne? update this checkout)"
            )
        chunk = CHUNK_BYTES
        if version >= 2:
            ck = meta.get("checksum") or {}
            if ck.get("algorithm") != "crc32" or not isinstance(ck.get("chunk_bytes"), int):
                raise ValueError(
                    f"{url}: version {version} but checksum={meta.get('checksum')!r}; expected "
                    "{'algorithm': 'crc32', 'chunk_bytes': N}"
                )
            chunk = ck["chunk_bytes"]
            for s in meta["shards"]:
                if s.get("samples") and not s.get("checksums"):
                    raise ValueError(
                        f"{url}: shard {s.get('name')} has no 'checksums' file; expected one "
                        f"per shard in index version {version} (rewrite the dataset)"
                    )
        shards = [
            Shard(
                url=sibling_url(url, s["name"]),
                sidecar=sibling_url(url, s["index"]) if s.get("index") else None,
                samples=int(s["samples"]),
                tokens=int(s["tokens"]),
                checksums=sibling_url(url, s["checksums"]) if s.get("checksums") else None,
            )
            for s in meta["shards"]
        ]
        if sum(s.samples for s in shards) == 0:
            raise ValueError(
                f"data.path={path!r}: {url} lists {len(shards)} shard(s) holding no documents; "
                "expected at least one (write the dataset again with `mnemo data text`)"
            )
        return cls(
            shards,
            dtype=np.dtype(meta["dtype"]).newbyteorder("<"),
            sep_id=int(meta["sep_id"]),
            vocab_size=meta.get("vocab_size"),
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            on_error=on_error,
            verify=verify,
            chunk_bytes=chunk,
        )

    @classmethod
    def _from_urls(cls, urls: list[str], *, tokenizer: str, where: str, **kw: Any) -> ShardSource:
        from data.tokenizers import load_tokenizer

        if not urls:
            raise ValueError(f"data.path={where!r}: the shard pattern matches no URLs")
        files, tables, shards, seen = RangeReader(), {}, [], Counter()
        for k, u in enumerate(urls):
            table, dtypes = scan_shard(u, files)
            seen.update(d.str for d in dtypes)
            tables[k] = table
            shards.append(Shard(u, None, len(table), int(table["ntok"].sum())))
        files.close()
        if sum(s.samples for s in shards) == 0:
            raise ValueError(
                f"data.path={where!r}: the {len(urls)} shard(s) ({', '.join(urls[:3])}) hold no "
                f"documents (*.{TOKENS_EXT} members); expected at least one"
            )
        usable = [d for d, _ in seen.most_common() if d in ("<u2", "<u4")]
        tok = load_tokenizer(tokenizer)
        return cls(
            shards,
            dtype=np.dtype(usable[0] if usable else "<u2"),
            sep_id=tok.sep_id,
            vocab_size=tok.vocab_size,
            tables=tables,
            **kw,
        )

    def split(self, split: str, eval_fraction: float) -> ShardSource:
        """The train or eval share of the shards (held-out shards; see module docstring)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
        if eval_fraction <= 0:
            if split == "eval":
                raise ValueError("eval on shards needs data.eval_fraction > 0 (held-out shards)")
            return self
        n = len(self.shards)
        n_eval = math.ceil(eval_fraction * n)
        if n_eval >= n:
            raise ValueError(
                f"data.eval_fraction={eval_fraction} holds out {n_eval} of {n} shard(s), leaving "
                f"none to train on; write more shards (a smaller --shard-size)"
            )
        held = set(np.random.default_rng(_EVAL_SEED).permutation(n)[:n_eval].tolist())
        keep = [k for k in range(n) if (k in held) == (split == "eval")]
        new = ShardSource(
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
        return new

    def fingerprint(self) -> str:
        """Identifies the dataset (names and counts, not its location) for resume checks."""
        desc = [(s.url.rsplit("/", 1)[-1], s.samples, s.tokens) for s in self.shards]
        return hashlib.sha1(json.dumps(desc).encode()).hexdigest()[:16]

    # -- layout ----------------------------------------------------------------------------

    def _table(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard k's per-document table and its token prefix sums (with separators)."""
        hit = self._tables.get(k)
        if hit is not None:
            self._tables.move_to_end(k)
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
        self._tables[k] = (table, prefix)
        while len(self._tables) > 64:
            self._tables.popitem(last=False)
        return table, prefix

    def _checks(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard k's chunk crc32s and, per document, the index of its first chunk (len + 1)."""
        hit = self._crcs.get(k)
        if hit is not None:
            self._crcs.move_to_end(k)
            return hit
        s, (table, _) = self.shards[k], self._table(k)
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
        while len(self._crcs) > 64:
            self._crcs.popitem(last=False)
        return crcs, starts

    def _epoch(self, e: int) -> tuple[np.ndarray, ...]:
        """(shard permutation, doc prefix, token prefix) of epoch e, in permuted order."""
        hit = self._epochs.get(e)
        if hit is None:
            perm = np.random.default_rng([self.seed, e, _SHARD_SALT]).permutation(len(self.shards))
            cum_docs = np.concatenate([[0], np.cumsum(self._samples[perm])])
            cum_toks = np.concatenate([[0], np.cumsum(self._tokens[perm] + self._samples[perm])])
            hit = self._epochs[e] = (perm, cum_docs, cum_toks)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return hit

    def _window(self, e: int, w: int) -> _Window:
        win = self._windows.get((e, w))
        if win is not None:
            return win
        perm, cum_docs, cum_toks = self._epoch(e)
        a, b = w * self.buffer, min(self.num_docs, (w + 1) * self.buffer)
        k = int(np.searchsorted(cum_docs, a, side="right")) - 1
        _, prefix = self._table(int(perm[k]))
        tok_start = int(cum_toks[k] + prefix[a - cum_docs[k]])
        shard, local, ntok, pos = [], [], [], a
        while pos < b:
            sk = int(perm[k])
            lo, hi = pos - int(cum_docs[k]), min(int(self._samples[sk]), b - int(cum_docs[k]))
            if hi > lo:
                table, _ = self._table(sk)
                shard.append(np.full(hi - lo, sk, dtype=np.int64))
                local.append(np.arange(lo, hi, dtype=np.int64))
                ntok.append(table["ntok"][lo:hi])
                pos += hi - lo
            k += 1
        order = np.random.default_rng([self.seed, e, w, _WINDOW_SALT]).permutation(b - a)
        sh, lc, nt = (np.concatenate(x)[order] for x in (shard, local, ntok))
        cum = np.zeros(b - a + 1, dtype=np.int64)
        np.cumsum(nt + 1, out=cum[1:])
        win = self._windows[(e, w)] = _Window(tok_start, sh, lc, nt, cum)
        while len(self._windows) > 8:
            self._windows.popitem(last=False)
        return win

    def _doc(self, g: int) -> tuple[_Window, int]:
        e, p = divmod(g, self.num_docs)
        w, j = divmod(p, self.buffer)
        return self._window(e, w), j

    def locate(self, t: int) -> DocPos:
        """Global token position -> (global document, offset into it)."""
        e, u = divmod(t, self.epoch_tokens)
        perm, cum_docs, cum_toks = self._epoch(e)
        # Windows cover the same tokens shuffled or not: find u's window in shard order.
        k = int(np.searchsorted(cum_toks, u, side="right")) - 1
        _, prefix = self._table(int(perm[k]))
        s = int(cum_docs[k]) + int(np.searchsorted(prefix, u - cum_toks[k], side="right")) - 1
        w = s // self.buffer
        win = self._window(e, w)
        v = u - win.tok_start
        j = int(np.searchsorted(win.cum, v, side="right")) - 1
        return DocPos(e * self.num_docs + w * self.buffer + j, int(v - win.cum[j]))

    def length(self, g: int) -> int:
        win, j = self._doc(g)
        return int(win.ntok[j])

    def doc_key(self, g: int) -> tuple[str, str]:
        """(shard URL, sample key) of global document g."""
        win, j = self._doc(g)
        table, _ = self._table(int(win.shard[j]))
        return self.shards[int(win.shard[j])].url, table["key"][int(win.local[j])].decode()

    # -- reading ---------------------------------------------------------------------------

    def read(self, g: int, lo: int, hi: int) -> np.ndarray | None:
        """Tokens [lo, hi) of document g; None if it is bad and on_error is 'skip'."""
        win, j = self._doc(g)
        try:
            return self._read(int(win.shard[j]), int(win.local[j]), lo, hi)
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
        table, _ = self._table(k)
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


class PackedBatches(torch.utils.data.IterableDataset):
    """One rank's batches of packed sequences from global token position `start`.

    Rank-local sequence j is global sequence `j * world + rank`; worker w of n yields rank-local
    batches w, w + n, ... (a DataLoader hands them back in batch order).
    """

    def __init__(
        self,
        source: ShardSource,
        *,
        seq_len: int,
        batch_size: int,
        rank: int,
        world: int,
        start: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.rank, self.world, self.start = rank, world, start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = wid
        while True:
            yield self.batch(b, compact=info is not None)
            b += nw

    def batch(self, b: int, *, compact: bool = False) -> dict[str, torch.Tensor]:
        """Rank-local batch b: tokens (B, L+1), doc_ids (B, L), loss_mask (B, L) if any skips.

        `compact` (DataLoader workers) sends int32 tokens and doc ids relative to `_doc_base`,
        half the bytes through shared memory; `ShardLoader` widens them to int64.
        """
        src, n, L = self.source, self.batch_size, self.seq_len
        dtype = np.int32 if compact else np.int64
        tokens = np.empty((n, L + 1), dtype=dtype)
        ids = np.empty((n, L), dtype=dtype)
        if getattr(self, "_mask", None) is None or self._mask.shape != (n, L + 1):
            self._mask = np.ones((n, L + 1), dtype=np.float32)  # reused while clean
        mask, skipped, base, skipped_docs = self._mask, 0, 0, []
        src.take_skip_reasons()
        for r in range(n):
            g = (b * n + r) * self.world + self.rank
            pos = src.locate(self.start + g * L)
            if r == 0 and compact:
                base = pos.doc  # rows follow each other in the stream: no smaller id comes
            _, sk = pack_into(
                tokens[r],
                ids[r],
                pos,
                length=src.length,
                read=src.read,
                sep=src.sep_id,
                mask_out=mask[r],
                id_base=base,
                skipped_docs=skipped_docs,
            )
            skipped += sk
        out = {"tokens": torch.from_numpy(tokens), "doc_ids": torch.from_numpy(ids)}
        if mask.min() < 1:  # loss_mask[t] weighs the target tokens[t + 1]
            out["loss_mask"] = torch.from_numpy(np.ascontiguousarray(mask[:, 1:]))
            mask.fill(1.0)
        out["_skipped"] = torch.tensor(skipped)
        if skipped_docs:  # named by the loader (a DataLoader passes lists of str through)
            why = src.take_skip_reasons()
            out["_skipped_names"] = [
                list(why.get(g) or (*src.doc_key(g), "unreadable"))
                for g in skipped_docs[:_NAMED_SKIPS]
            ]
        if compact:
            out["_doc_base"] = torch.tensor(base, dtype=torch.int64)
        return out


class ShardLoader:
    """The BatchLoader of token shards (data/base.py); state = global token position."""

    def __init__(
        self,
        source: ShardSource,
        *,
        seq_len: int,
        batch_size: int,
        rank: int,
        world: int,
        num_workers: int = 0,
    ) -> None:
        check_seq_len(seq_len)
        if batch_size < 1 or not (0 <= rank < world):
            raise ValueError(
                f"batch_size={batch_size}, rank={rank}, world={world}; expected "
                "batch_size >= 1 and 0 <= rank < world"
            )
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.token = 0
        self._info = LoaderInfo()
        self._said_rest = False  # 'the rest are only counted' logged once

    @property
    def info(self) -> LoaderInfo:
        return self._info

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = PackedBatches(
            self.source,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            rank=self.rank,
            world=self.world,
            start=self.token,
        )
        if self.num_workers == 0:
            it = iter(ds)
        else:
            # Workers only run numpy and file reads: fork them even where the process itself
            # was spawned (torch.multiprocessing.spawn, Ray), which would re-import everything.
            ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
            it = iter(
                torch.utils.data.DataLoader(
                    ds,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=2,
                    persistent_workers=False,
                    multiprocessing_context=ctx,
                )
            )
        for batch in it:
            self._info.skipped_samples += int(batch.pop("_skipped"))
            for url, key, why in batch.pop("_skipped_names", []):
                self._name_skip(url, key, why)
            if "_doc_base" in batch:
                batch["tokens"] = batch["tokens"].long()
                batch["doc_ids"] = batch["doc_ids"].long() + batch.pop("_doc_base")
            # Every rank consumes one batch per step: the global position moves by B * world.
            self.token += self.batch_size * self.world * self.seq_len
            yield batch

    def _name_skip(self, url: str, key: str, why: str) -> None:
        """Log and keep the first _NAMED_SKIPS skipped samples; after that, say they are only
        counted (the count reaches metrics.jsonl as skipped_samples)."""
        ex = self._info.skipped_examples
        if len(ex) < _NAMED_SKIPS:
            ex.append({"shard": url, "key": key, "reason": why})
            log.warning("skipped sample %r of shard %s: %s (data.on_error=skip)", key, url, why)
        elif not self._said_rest:
            self._said_rest = True
            log.warning(
                "more than %d samples skipped; the rest are only counted (skipped_samples)",
                _NAMED_SKIPS,
            )

    def state_dict(self) -> dict[str, Any]:
        pos = self.source.locate(self.token)
        epoch, doc = divmod(pos.doc, self.source.num_docs)
        return {
            "token": self.token,
            "epoch": epoch,
            "doc": doc,
            "offset": pos.offset,
            "seed": self.source.seed,
            "dataset": self.source.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("token", "seed", "dataset"):
            if k not in state:
                raise ValueError(f"shard loader state {state!r} has no {k!r}")
        if state["dataset"] != self.source.fingerprint() or state["seed"] != self.source.seed:
            raise ValueError(
                f"shard loader state is for dataset {state['dataset']} seed {state['seed']}; "
                f"this loader reads {self.source.fingerprint()} seed {self.source.seed}"
            )
        self.token = int(state["token"])


def build_shard_loader(
    cfg: DataConfig,
    *,
    seq_len: int,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    split: str = "train",
) -> ShardLoader:
    """Packed (batch_size, seq_len + 1) batches of `cfg.path` for this rank (see docstring)."""
    source = ShardSource.open(
        cfg.path,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        on_error=cfg.on_error,
        tokenizer=cfg.tokenizer,
    )
    source = source.split(split, cfg.eval_fraction)
    return ShardLoader(
        source,
        seq_len=seq_len,
        batch_size=batch_size,
        rank=rank,
        world=world,
        num_workers=cfg.num_workers,
    )


__all__ = [
    "PackedBatches",
    "Shard",
    "ShardDataError",
    "ShardLoader",
    "ShardSource",
    "build_shard_loader",
    "expand_urls",
    "index_url",
]
