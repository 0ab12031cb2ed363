"""Which shards a `data.path` names: a dataset's index.json, or a shard pattern.

A dataset directory written by `mnemo data text` (data/shard_format.py) is read through its
index.json: every shard's URL, sample and token counts, its sidecar table and (index version 2)
its checksum file. Shards without sidecars (made by other tools: `data.path` a shard pattern
like `DIR/shard-{000000..000009}.tar`) are indexed once at start by walking their tar headers.
`check_shard_path` is the config-time check of a local `data.path`: the files exist, eval
leaves shards to train on; it opens no shard. Torch-free (numpy only).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import braceexpand
import numpy as np

from data.shard_format import CHUNK_BYTES, FORMAT, INDEX_NAME, INDEX_VERSION, TOKENS_EXT, scan_shard
from data.shard_order import eval_shard_count
from data.shard_urls import RangeReader, read_url, url_exists


@dataclass(frozen=True)
class Shard:
    url: str
    sidecar: str | None  # URL of its .idx.npy, None: walk the tar headers
    samples: int
    tokens: int
    checksums: str | None = None  # URL of its .crc.npy (index version 2), None: not verified


@dataclass(frozen=True)
class ShardIndex:
    """A token dataset as its index.json describes it."""

    shards: list[Shard]
    dtype: np.dtype
    sep_id: int
    vocab_size: int | None
    chunk_bytes: int  # checksum chunk size (index version 2)


def expand_urls(spec: str) -> list[str]:
    """`a.tar,b.tar` and brace patterns `shard-{000000..000009}.tar` -> list of URLs."""
    return [u for part in spec.split(",") if part for u in braceexpand.braceexpand(part)]


def index_url(path: str) -> str:
    """index.json of a dataset given as a directory, a directory URL or the index itself."""
    if path.endswith(".json") or INDEX_NAME in path:
        return path
    return path.rstrip("/") + "/" + INDEX_NAME


def sibling_url(url: str, name: str) -> str:
    """URL of file `name` next to index.json: the last `index.json` in the URL replaced.

    Works for paths, fsspec URLs and `pipe:` commands alike (`pipe:aws s3 cp s3://b/d/index.json -`
    -> `pipe:aws s3 cp s3://b/d/shard-000000.tar -`).
    """
    i = url.rfind(INDEX_NAME)
    if i < 0:
        raise ValueError(f"{url!r} does not name an {INDEX_NAME}")
    return url[:i] + name + url[i + len(INDEX_NAME) :]


def is_shard_pattern(path: str) -> bool:
    """Whether `data.path` names tar shards (a pattern or list) rather than a dataset."""
    return ".tar" in path and not path.endswith(".json")


def _index_meta(url: str) -> Any:
    return json.loads(read_url(url))


def read_index(path: str) -> ShardIndex:
    """The dataset at `path` (a directory, a directory URL or its index.json), checked."""
    url = index_url(path)
    if not url_exists(url):
        raise FileNotFoundError(
            f"data.path={path!r}: no {INDEX_NAME} at {url}; expected a directory written by "
            f"`mnemo data text` or a shard pattern like DIR/shard-{{000000..000009}}.tar"
        )
    meta = _index_meta(url)
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
    return ShardIndex(
        shards,
        dtype=np.dtype(meta["dtype"]).newbyteorder("<"),
        sep_id=int(meta["sep_id"]),
        vocab_size=meta.get("vocab_size"),
        chunk_bytes=chunk,
    )


def scan_shards(
    urls: list[str], *, where: str
) -> tuple[list[Shard], dict[int, np.ndarray], np.dtype]:
    """Shards of a pattern, indexed by walking their tar headers: (shards, their tables, the
    token dtype most of their members use). `where` is the data.path errors name."""
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
    return shards, tables, np.dtype(usable[0] if usable else "<u2")


def check_shard_path(path: str, eval_fraction: float = 0.0) -> int | None:
    """A shard pattern's files, or the dataset's index.json, exist; returns its vocab_size.

    Refuses an eval_fraction that holds out every shard of the index. A malformed index.json
    passes (None): the reader names what is wrong with it.
    """
    if is_shard_pattern(path):
        files = expand_urls(path)
        missing = [f for f in files if not url_exists(f)]
        if missing:
            raise ValueError(
                f"data.path={path!r}: {len(missing)} of {len(files)} shard file(s) do not exist "
                f"(first: {missing[0]!r})"
            )
        return None
    index = index_url(path)
    if not url_exists(index):
        raise ValueError(
            f"data.path={path!r}: {index} does not exist; expected a directory written by "
            "`mnemo data text`, its index.json, or a shard pattern like "
            "DIR/shard-{000000..000009}.tar"
        )
    try:
        meta = _index_meta(index)
        vocab, shards = meta.get("vocab_size"), len(meta.get("shards") or [])
    except (json.JSONDecodeError, AttributeError, TypeError):
        return None  # the reader names what is wrong with it
    if eval_fraction > 0 and shards and eval_shard_count(shards, eval_fraction) >= shards:
        raise ValueError(
            f"data.eval_fraction={eval_fraction} holds out all {shards} shard(s) of {index}, "
            "leaving none to train on; expected a smaller fraction or a dataset written in more "
            "shards (mnemo data text --shard-size)"
        )
    return vocab if isinstance(vocab, int) else None
