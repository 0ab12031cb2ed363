"""Reading files by URL: whole small files, existence, and ranged reads of shards.

URLs: local paths, `file://`, any fsspec URL (s3://, gs://, https://; ranged reads through
fsspec's block cache) and `pipe:CMD` (stdout of a shell command, as webdataset reads it; a
pipe cannot seek, so a process spools each shard it touches to an unlinked temp file once).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://") :]
    if url.startswith("pipe:") or "://" in url:
        return None
    return url


def _fsspec() -> Any:
    """fsspec, imported on first use: deliberately lazy, since only remote URLs need it and it
    takes ~0.1 s to import (the config-time path check and local datasets never pay for it)."""
    import fsspec

    return fsspec


def _run_pipe(cmd: str, out: BinaryIO) -> None:
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    shutil.copyfileobj(proc.stdout, out, 1 << 20)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        raise OSError(f"pipe command {cmd!r} exited with status {proc.returncode}: {err.strip()}")


def read_url(url: str) -> bytes:
    """The whole content of a small file (index.json, a sidecar) at any supported URL."""
    path = _local_path(url)
    if path is not None:
        return Path(path).read_bytes()
    if url.startswith("pipe:"):
        buf = io.BytesIO()
        _run_pipe(url[len("pipe:") :], buf)
        return buf.getvalue()
    with _fsspec().open(url, "rb") as f:
        return f.read()


def url_exists(url: str) -> bool:
    """Whether `url` names an existing file (pipe commands are assumed to exist)."""
    path = _local_path(url)
    if path is not None:
        return os.path.isfile(path)
    if url.startswith("pipe:"):
        return True
    fs, p = _fsspec().core.url_to_fs(url)
    return fs.isfile(p)


class RangeReader:
    """Per-process cache of open shards for ranged reads (local: os.pread; fsspec: seek+read;
    pipe: spooled once to an unlinked temp file). Handles are never shared across a fork."""

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self._pid = os.getpid()
        self._open: OrderedDict[str, Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_open"])

    def file(self, url: str) -> BinaryIO:
        """A seekable file object for `url` (kept open in a small LRU)."""
        if os.getpid() != self._pid:  # forked DataLoader worker: open our own handles
            self._open = OrderedDict()
            self._pid = os.getpid()
        f = self._open.pop(url, None)
        if f is None:
            f = self._open_url(url)
        self._open[url] = f
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return f

    @staticmethod
    def _open_url(url: str) -> BinaryIO:
        path = _local_path(url)
        if path is not None:
            return open(path, "rb", buffering=0)  # kept open in the LRU
        if url.startswith("pipe:"):
            tmp = tempfile.TemporaryFile(prefix="mnemo-spool-")  # unlinked: gone with the process
            _run_pipe(url[len("pipe:") :], tmp)
            tmp.flush()  # reads go through os.pread, under the buffer
            return tmp
        return _fsspec().open(url, "rb", block_size=4 << 20).open()

    def size(self, url: str) -> int:
        """Size of the file at `url` in bytes, as it was when opened."""
        f = self.file(url)
        size = getattr(f, "mnemo_size", None)
        if size is None:
            try:
                size = os.fstat(f.fileno()).st_size
            except (AttributeError, OSError, io.UnsupportedOperation):
                size = getattr(f, "size", None)
                size = int(size) if size is not None else f.seek(0, io.SEEK_END)
            try:
                f.mnemo_size = size  # type: ignore[attr-defined]
            except AttributeError:  # objects with __slots__: ask again next time
                pass
        return size

    def pread(self, url: str, offset: int, n: int) -> bytes:
        """Up to `n` bytes at `offset` (fewer only at the end of the file)."""
        f = self.file(url)
        try:
            fd = f.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            fd = None
        if fd is None:
            f.seek(offset)
            return f.read(n)
        parts, got = [], 0
        while got < n:
            b = os.pread(fd, n - got, offset + got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
