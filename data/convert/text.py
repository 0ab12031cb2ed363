"""`mnemo data text`: text files, directories, .jsonl and .gz -> token shards + index.json.

One sample per document: a whole text file, or one line of a .jsonl file (its `--jsonl-field`).
Directories are walked recursively in sorted order; files whose first 8 KB hold a NUL byte
are binary (git's test) and skipped, hidden files too; both are counted, so the summary
accounts for every input byte: with the byte tokenizer, tokens == text bytes exactly.
The writer keeps input order; the reader shuffles (data/shard_order.py).

Refused, naming the path: inputs that hold no document (empty, binary-only; no output is left),
an `--out` that is a file, or a non-empty `--out` that is not an earlier output of ours
(`index.json`, `shard-*.tar|idx.npy|crc.npy`); an earlier output is replaced with `--force`
only, and the replacement is announced on stderr.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data.shard_format import (
    CHECKSUM,
    FORMAT,
    INDEX_NAME,
    INDEX_VERSION,
    ShardWriter,
    token_dtype,
    write_index,
)
from data.tokenizers import load_tokenizer

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """`256MB` (10^6 bytes), `64MiB` (2^20 bytes) or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    unit = (m.group(2) or "").upper() if m else None
    if m is None or unit not in _UNITS and unit + "B" not in _UNITS:
        raise ValueError(f"--shard-size {text!r}: expected a size like 256MB, 64MiB or 1000000")
    return int(float(m.group(1)) * _UNITS.get(unit, _UNITS.get(unit + "B", 1)))


@dataclass
class TextStats:
    """Where every input byte went (written to index.json as `inputs`)."""

    files: int = 0  # text files read (plain, .gz, .jsonl)
    disk_bytes: int = 0  # their size on disk
    raw_bytes: int = 0  # after gunzip
    text_bytes: int = 0  # bytes handed to the tokenizer (jsonl: the field values, UTF-8)
    jsonl_lines: int = 0
    skipped_binary: int = 0
    skipped_binary_bytes: int = 0
    skipped_hidden: int = 0
    skipped_hidden_bytes: int = 0
    empty_documents: int = 0  # zero-length documents (not written)
    documents: int = 0
    tokens: int = 0


def list_inputs(paths: list[str], stats: TextStats) -> list[Path]:
    """Files named or found (recursively, sorted) under `paths`; hidden entries are counted."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file():
                    continue
                if any(part.startswith(".") for part in f.relative_to(p).parts):
                    stats.skipped_hidden += 1
                    stats.skipped_hidden_bytes += f.stat().st_size
                    continue
                out.append(f)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"--input {raw!r} is neither a file nor a directory")
    return out


def _read(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from None
    return path.read_bytes()


def iter_documents(
    files: list[Path], *, jsonl_field: str, stats: TextStats, progress: Any = None
) -> Iterator[tuple[str, bytes]]:
    """(source, text bytes) per document, updating `stats` as files are read."""
    for path in files:
        size = path.stat().st_size
        data = _read(path)
        if b"\0" in data[:8192]:
            stats.skipped_binary += 1
            stats.skipped_binary_bytes += size
        else:
            stats.files += 1
            stats.disk_bytes += size
            stats.raw_bytes += len(data)
            name = path.name[:-3] if path.suffix == ".gz" else path.name
            if name.endswith(".jsonl"):
                yield from _jsonl_docs(path, data, jsonl_field, stats)
            else:
                stats.text_bytes += len(data)
                yield str(path), data
        if progress is not None:
            progress.update(size)


def _jsonl_docs(
    path: Path, data: bytes, field: str, stats: TextStats
) -> Iterator[tuple[str, bytes]]:
    for n, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        stats.jsonl_lines += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(
                f"{path}:{n}: no field {field!r} (has {keys}); pick one with --jsonl-field"
            )
        value = obj[field]
        if not isinstance(value, str):
            raise ValueError(
                f"{path}:{n}: field {field!r} is a {type(value).__name__}; expected a string"
            )
        text = value.encode("utf-8")
        stats.text_bytes += len(text)
        yield f"{path}:{n}", text


# What `mnemo data` writes into --out (and the temp names of a run that died mid-write).
_OURS = re.compile(r"^\.?(index\.json|shard-\d{6}\.(tar|idx\.npy|crc\.npy))(\.tmp\.\d+)?$")


def check_output(out: Path, force: bool) -> list[Path]:
    """Refuse (ValueError naming the path) to write into a file, beside unrelated files, or over
    an earlier dataset without `force`; returns the earlier output's files."""
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "" if p == out else f": {p} "
                raise ValueError(
                    f"--out {out}{where or ' '}is a file; expected a directory (new, empty, or an "
                    "earlier output of `mnemo data`)"
                )
            break
    entries = sorted(out.iterdir()) if out.is_dir() else []
    foreign = [e.name + "/" * e.is_dir() for e in entries if e.is_dir() or not _OURS.match(e.name)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if foreign[5:] else "")
        raise ValueError(
            f"--out {out} holds files that are not an earlier output of `mnemo data`: {shown}; "
            "expected a new or empty folder (--force replaces only index.json + shard-* files)"
        )
    if entries and not force:
        raise ValueError(
            f"--out {out} already holds a dataset ({entries[0].name}, {len(entries)} file(s)); "
            "pass --force to replace it"
        )
    return entries


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A folder beside `out` to write the new dataset into, swapped in only once complete.

    A conversion that fails (bad input half-way, nothing to convert, Ctrl-C) leaves `out` as it
    was: the earlier dataset with --force, or no new folder. The swap removes the old files
    index.json first and moves the new ones in index.json last, so a reader never sees a
    dataset whose index names shards that are not there.
    """
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        old = check_output(out, force)  # again: the folder may have changed while we converted
        if old:
            shards = sum(e.name.endswith(".tar") for e in old)
            print(
                f"mnemo data: replacing the earlier output in {out} ({shards} shard(s))",
                file=sys.stderr,
            )
        out.mkdir(exist_ok=True)
        for e in sorted(old, key=lambda e: e.name != INDEX_NAME):
            e.unlink()
        for e in sorted(stage.iterdir(), key=lambda e: e.name == INDEX_NAME):
            os.replace(e, out / e.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # empty after a swap; the partial output else


def _may_hold_text(path: Path) -> bool:
    """False for an empty or binary file (the first 8 KB, as iter_documents judges it)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                head = f.read(8192)
        else:
            with open(path, "rb") as f:
                head = f.read(8192)
    except (OSError, EOFError):
        return True  # unreadable: the real read names the problem
    return bool(head) and b"\0" not in head


def _no_documents(inputs: list[str], stats: TextStats, files: int) -> ValueError:
    return ValueError(
        f"--input {' '.join(inputs)}: no text documents found in {files} file(s) "
        f"({stats.skipped_binary} binary, {stats.skipped_hidden} hidden, "
        f"{stats.empty_documents} empty document(s)); expected at least one non-empty text "
        "file, .gz or .jsonl line"
    )


def convert_text(
    inputs: list[str],
    out: str | Path,
    *,
    tokenizer: str = "byte",
    shard_size: str | int = "256MB",
    jsonl_field: str = "text",
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `inputs` into shards under `out`; returns the index.json content."""
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size).newbyteorder("<")
    out = Path(out)
    max_bytes = parse_size(shard_size)
    stats = TextStats()
    files = list_inputs(inputs, stats)
    if not any(_may_hold_text(f) for f in files):  # before --out is touched
        stats.skipped_binary = sum(f.stat().st_size > 0 for f in files)
        stats.empty_documents = len(files) - stats.skipped_binary
        raise _no_documents(inputs, stats, len(files) + stats.skipped_hidden)
    with staged_output(out, force) as stage:
        meta = _tokenize_into(
            stage, files, tok, tokenizer, dtype, max_bytes, jsonl_field, stats, progress, inputs
        )
    return meta


def _tokenize_into(
    stage: Path,
    files: list[Path],
    tok: Any,
    tokenizer: str,
    dtype: np.dtype,
    max_bytes: int,
    jsonl_field: str,
    stats: TextStats,
    progress: bool,
    inputs: list[str],
) -> dict[str, Any]:
    """Shards and index.json of `files` under `stage`; the index content."""
    bar = _progress_bar(sum(f.stat().st_size for f in files), progress)
    try:
        with ShardWriter(stage, max_bytes=max_bytes) as writer:
            for source, text in iter_documents(
                files, jsonl_field=jsonl_field, stats=stats, progress=bar
            ):
                ids = np.asarray(tok.encode(text))
                if len(ids) == 0:
                    stats.empty_documents += 1
                    continue
                if int(ids.max()) >= tok.vocab_size:
                    raise ValueError(
                        f"{source}: token id {int(ids.max())} >= vocab_size "
                        f"{tok.vocab_size} of tokenizer {tokenizer!r}"
                    )
                writer.add_tokens(f"{stats.documents:010d}", ids.astype(dtype))
                stats.documents += 1
                stats.tokens += len(ids)
    finally:
        bar.close()
    if stats.documents == 0:  # e.g. jsonl lines with empty text: nothing was written
        raise _no_documents(inputs, stats, len(files) + stats.skipped_hidden)
    shards = writer.shards
    meta = {
        "format": FORMAT,
        "version": INDEX_VERSION,
        "checksum": CHECKSUM,
        "kind": "tokens",
        "created_by": "mnemo data text",
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "sep_id": tok.sep_id,
        "dtype": dtype.name,
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        },
        "inputs": asdict(stats),
    }
    write_index(stage, meta)
    return meta


def _progress_bar(total: int, enabled: bool) -> Any:
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=not enabled,
        desc="reading",
        mininterval=0.5,
    )


def summary(meta: dict[str, Any]) -> str:
    """The end-of-run report: where the bytes went and what was written."""
    s, t = meta["inputs"], meta["totals"]
    lines = [
        f"read {s['files']} text file(s): {s['disk_bytes']:,} bytes on disk, "
        f"{s['raw_bytes']:,} after gunzip, {s['text_bytes']:,} bytes of text"
        + (f" ({s['jsonl_lines']:,} jsonl lines)" if s["jsonl_lines"] else ""),
        f"skipped {s['skipped_binary']} binary file(s) ({s['skipped_binary_bytes']:,} bytes), "
        f"{s['skipped_hidden']} hidden file(s) ({s['skipped_hidden_bytes']:,} bytes), "
        f"{s['empty_documents']} empty document(s)",
        f"wrote {t['samples']:,} documents, {t['tokens']:,} tokens ({meta['dtype']}, tokenizer "
        f"{meta['tokenizer']}) in {t['shards']} shard(s), {t['bytes']:,} bytes",
    ]
    return "\n".join(lines)
