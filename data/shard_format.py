"""The on-disk format of token shards: writer, header checks, tar scan.

A dataset directory holds `shard-000000.tar ...` (plain ustar; each document one member
`<key>.tokens.npy`, a 1-D uint16/uint32 array), a sidecar `shard-000000.idx.npy` per token
shard (one row per document: key, member offset, first-token offset, token count) so a reader
seeks straight to any document, and `index.json` (shards with sample / token / byte counts,
totals, tokenizer, dtype, separator), written last so a half-written dataset is never read.
Every file is written to a temporary name and renamed into place.

Checksums (index version 2). Each token shard also has `shard-000000.crc.npy`: zlib.crc32 of
every CHUNK_BYTES chunk of every member's token bytes (after the .npy header; a member's last
chunk may be short), members in table order, so a reader verifies exactly the chunks a slice
touches. The tar itself is unchanged (tar and plain webdataset read it as before), and so is
the sidecar table: readers that predate checksums read version-2 datasets too. Version-1
datasets (no `checksum` in index.json) read without verification.

URLs: any kind data/shard_urls.py reads (local paths, `file://`, fsspec URLs, `pipe:CMD`).
No pickle anywhere: `np.load(..., allow_pickle=False)` and our own header parsing.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from data.shard_urls import RangeReader

INDEX_NAME = "index.json"
FORMAT = "mnemosyne-shards"
INDEX_VERSION = 2  # 1: no checksums; 2: per-chunk crc32 of token bytes in *.crc.npy
CHUNK_BYTES = 4096  # small: a slice read widens to chunk bounds (< 8 KB more per slice)
CHECKSUM = {"algorithm": "crc32", "chunk_bytes": CHUNK_BYTES}  # index.json "checksum"
CRC_DTYPE = np.dtype("<u4")
TOKENS_EXT = "tokens.npy"
TABLE_DTYPE = np.dtype([("key", "S64"), ("member", "<i8"), ("data", "<i8"), ("ntok", "<i8")])
_BLOCK = 512
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_NPY_RE = re.compile(
    rb"^\{'descr': '([<>|=][a-zA-Z]\d+)', 'fortran_order': (False|True), 'shape': \((\d+),\), \}"
)


class ShardDataError(ValueError):
    """A sample that cannot be used as written; names the shard and the key."""

    def __init__(self, url: str, key: str | None = None, what: str | None = None) -> None:
        if what is None:  # rebuilt from its message alone (DataLoader workers re-raise so)
            super().__init__(url)
            self.url, self.key, self.what = "", None, url
            return
        where = f"shard {url}" + (f", sample {key!r}" if key is not None else "")
        super().__init__(f"{where}: {what}")
        self.url, self.key, self.what = url, key, what


def chunk_crcs(payload: bytes | memoryview, chunk: int = CHUNK_BYTES) -> list[int]:
    """zlib.crc32 of each `chunk`-byte piece of `payload` (the last may be shorter)."""
    mv = memoryview(payload)
    return [zlib.crc32(mv[i : i + chunk]) for i in range(0, len(mv), chunk)]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}; expected a positive number of token ids")
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------
# Headers: built by tarfile / numpy when writing, checked by hand when reading (fast, no pickle)


def _tar_header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, 0o644, 0  # fixed mtime: identical inputs, identical shards
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def parse_npy_header(buf: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header length) of an .npy prefix; ValueError says what is wrong."""
    if buf[:6] != b"\x93NUMPY":
        raise ValueError(f"not an .npy member (starts with {bytes(buf[:6])!r})")
    major = buf[6] if len(buf) > 6 else 0
    if major == 1:
        start, hlen = 10, int.from_bytes(buf[8:10], "little")
    elif major in (2, 3):
        start, hlen = 12, int.from_bytes(buf[8:12], "little")
    else:
        raise ValueError(f".npy format version {major} is unknown")
    text = bytes(buf[start : start + hlen])
    if len(text) < hlen:
        raise ValueError(f".npy header is cut short ({len(text)} of {hlen} bytes)")
    m = _NPY_RE.match(text)
    if m is not None:
        descr, fortran, shape = m.group(1).decode(), m.group(2) == b"True", (int(m.group(3)),)
    else:  # unusual spacing or not 1-D: parse the literal (never pickle) to name the problem
        try:
            d = ast.literal_eval(text.decode("latin1").strip())
            descr, fortran, shape = d["descr"], d["fortran_order"], tuple(d["shape"])
        except (ValueError, SyntaxError, KeyError, TypeError) as e:
            raise ValueError(f".npy header is unreadable ({e})") from None
    if fortran and len(shape) > 1:
        raise ValueError("array is Fortran-ordered; expected a 1-D C array")
    try:
        dtype = np.dtype(descr)
    except TypeError:
        raise ValueError(f".npy dtype {descr!r} is not a numpy dtype") from None
    return dtype, shape, start + hlen


def check_tar_header(hdr: bytes, name: str, size: int | None = None) -> str | None:
    """None when `hdr` is a valid ustar header for member `name` (of `size` bytes, if given),
    else why not."""
    if len(hdr) < _BLOCK:
        return "tar header is cut short"
    try:
        stored = int(hdr[148:156].split(b"\0")[0].strip() or b"-1", 8)
        got_size = int(hdr[124:136].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return "tar header fields are not octal numbers (corrupt member header)"
    if stored != sum(hdr[:148]) + 256 + sum(hdr[156:_BLOCK]):
        return "tar header checksum mismatch (corrupt member header)"
    raw = hdr[0:100].split(b"\0")[0]
    prefix = hdr[345:500].split(b"\0")[0] if hdr[257:262] == b"ustar" else b""
    full = (prefix + b"/" + raw if prefix else raw).decode("utf-8", "replace")
    if len(name.encode()) <= 100 and full != name:
        return f"tar member is named {full!r}; expected {name!r}"
    if size is not None and got_size != size:
        return f"tar member size is {got_size} bytes; expected {size}"
    return None


# ---------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and a rename."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ShardWriter:
    """Writes `shard-NNNNNN.tar` files of at most `max_bytes` each (a larger sample gets a shard
    of its own), atomically: a shard appears under its final name only once complete.

    `add_tokens` also records the sidecar row that lets readers seek to the document.
    """

    def __init__(self, out_dir: str | Path, *, max_bytes: int, prefix: str = "shard") -> None:
        if max_bytes < 2 * _BLOCK:
            raise ValueError(f"shard size {max_bytes} bytes is too small; expected >= {2 * _BLOCK}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.prefix = max_bytes, prefix
        self.shards: list[dict[str, Any]] = []
        self._f: BinaryIO | None = None
        self._tmp: Path | None = None
        self._rows: list[tuple[bytes, int, int, int]] = []
        self._crcs: list[int] = []
        self._keys: set[str] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._tmp = self.out_dir / f".{self._name}.tmp.{os.getpid()}"
        self._f = open(self._tmp, "wb")  # closed in _finish / abort
        self._size, self._samples, self._tokens, self._rows, self._crcs = 0, 0, 0, [], []

    def add(self, key: str, members: dict[str, bytes], *, tokens: int = -1) -> None:
        """Append one sample: `members` maps extension (`tokens.npy`, `png`, `cls`) to bytes."""
        if not _KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} is invalid; expected 1-64 of [A-Za-z0-9_-]")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} is written twice")
        self._keys.add(key)
        blobs = []
        for ext, data in members.items():
            hdr = _tar_header(f"{key}.{ext}", len(data))
            blobs.append((ext, hdr, data, b"\0" * (-len(data) % _BLOCK)))
        need = sum(len(h) + len(d) + len(p) for _, h, d, p in blobs)
        if self._f is not None and self._samples:
            if self._size + need + 2 * _BLOCK > self.max_bytes:
                self._finish()
        if self._f is None:
            self._open()
        assert self._f is not None
        for ext, hdr, data, pad in blobs:
            member = self._size
            self._f.write(hdr)
            self._f.write(data)
            self._f.write(pad)
            self._size += len(hdr) + len(data) + len(pad)
            if ext == TOKENS_EXT:
                _, shape, hlen = parse_npy_header(data[:4096])
                self._rows.append((key.encode(), member, member + len(hdr) + hlen, shape[0]))
                self._crcs += chunk_crcs(memoryview(data)[hlen:])
        self._samples += 1
        self._tokens += max(tokens, 0)

    def add_tokens(self, key: str, tokens: np.ndarray) -> None:
        """Append one document as `<key>.tokens.npy`."""
        self.add(key, {TOKENS_EXT: npy_bytes(tokens)}, tokens=len(tokens))

    def _finish(self) -> None:
        assert self._f is not None and self._tmp is not None
        self._f.write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
        self._size += 2 * _BLOCK
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        name = self._name
        rec: dict[str, Any] = {
            "name": name,
            "samples": self._samples,
            "tokens": self._tokens,
            "bytes": self._size,
        }
        if self._rows:
            table = np.array(self._rows, dtype=TABLE_DTYPE)
            rec["index"] = name[: -len(".tar")] + ".idx.npy"
            buf = io.BytesIO()
            np.save(buf, table, allow_pickle=False)
            atomic_write(self.out_dir / rec["index"], buf.getvalue())
            rec["checksums"] = name[: -len(".tar")] + ".crc.npy"
            atomic_write(
                self.out_dir / rec["checksums"], npy_bytes(np.array(self._crcs, dtype=CRC_DTYPE))
            )
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append(rec)
        self._f, self._tmp = None, None

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; returns one record per shard for index.json."""
        if self._f is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (finished shards stay)."""
        if self._f is not None:
            self._f.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._f, self._tmp = None, None


def write_index(out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write index.json atomically (last, so readers never see a half-written dataset)."""
    path = Path(out_dir) / INDEX_NAME
    atomic_write(path, (json.dumps(meta, indent=1) + "\n").encode())
    return path


# ---------------------------------------------------------------------------------------------
# Reading a shard that has no sidecar: walk its tar headers once (seeking past the data)


def scan_shard(url: str, files: RangeReader) -> tuple[np.ndarray, list[np.dtype]]:
    """Sidecar-equivalent table of a shard's `*.tokens.npy` members, read from tar headers.

    A member whose .npy header is unreadable stands in the table as one token, so reading it
    later raises (or is skipped and counted) at its place in the stream, naming its key.
    """
    rows, dtypes, end = [], [], 0
    f = files.file(url)
    f.seek(0)
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                try:
                    ti = tar.next()
                except tarfile.ReadError:  # truncated / corrupt tail: read errors come later
                    break
                if ti is None:
                    break
                base = ti.name.rsplit("/", 1)[-1]
                if not ti.isfile() or not base.endswith("." + TOKENS_EXT):
                    continue
                key = ti.name[: -len(TOKENS_EXT) - 1]
                head = files.pread(url, ti.offset_data, min(ti.size, 4096))
                try:
                    dtype, shape, hlen = parse_npy_header(head)
                    ntok = shape[0] if len(shape) == 1 else 1
                    dtypes.append(dtype)
                except ValueError:
                    hlen, ntok = 0, 1
                rows.append((key.encode(), ti.offset_data - _BLOCK, ti.offset_data + hlen, ntok))
            end = tar.offset
    except tarfile.ReadError as e:
        raise ShardDataError(url, None, f"is not a readable tar file ({e})") from None
    if files.pread(url, end, _BLOCK).strip(b"\0"):
        # tarfile stops quietly at a corrupt header; keep the rest visible as one bad sample
        rows.append((f"@{end}".encode(), end, end + _BLOCK, 1))
    return np.array(rows, dtype=TABLE_DTYPE), dtypes
