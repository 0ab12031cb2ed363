"""Shard reader throughput: ours (shuffled, packed, resumable) beside a plain webdataset pipeline
reading the same shards with the same worker count, and `cat` as the raw-read ceiling.

Writes ~200 MB of temporary token shards (byte-range tokens, uint16, log-normal document
lengths), reads one epoch each way with 0 and 2 DataLoader workers, prints tokens/s, MB/s and
ratios (ours with crc32 checksum verification on, the default, and off), then the cost of
verification as throughput ratios on/off (0 workers, best of 3 interleaved runs, so a busy
machine skews both alike; on_error=skip also verifies each document whole at its start),
then the time to feed one 2,097,152-token packed sequence. The page cache is warm for
every reader (the shards were just written), so this measures CPU cost, not the disk.

    python benchmarks/shard_throughput.py [--mb 200] [--seq-len 8192] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.packing import MAX_SEQ_LEN  # noqa: E402
from data.shard_format import (  # noqa: E402
    CHECKSUM,
    FORMAT,
    INDEX_VERSION,
    ShardWriter,
    write_index,
)
from data.shard_loader import ShardLoader  # noqa: E402
from data.shard_reader import ShardSource  # noqa: E402


def make_shards(out: Path, total_mb: int, mean_tokens: int, seed: int = 0) -> dict:
    """Random documents of log-normal length written as a token dataset under `out`."""
    rng = np.random.default_rng(seed)
    budget, n, tokens = total_mb * 10**6 // 2, 0, 0
    sigma = 1.0
    mu = np.log(mean_tokens) - sigma**2 / 2
    with ShardWriter(out, max_bytes=16 * 10**6) as w:
        while tokens < budget:
            k = int(min(max(rng.lognormal(mu, sigma), 16), 400_000))
            w.add_tokens(f"{n:010d}", rng.integers(0, 256, size=k, dtype=np.uint16))
            n, tokens = n + 1, tokens + k
    meta = {
        "format": FORMAT,
        "version": INDEX_VERSION,
        "checksum": CHECKSUM,
        "kind": "tokens",
        "tokenizer": "byte",
        "vocab_size": 258,
        "sep_id": 256,
        "dtype": "uint16",
        "shards": w.shards,
        "totals": {
            "shards": len(w.shards),
            "samples": n,
            "tokens": tokens,
            "bytes": sum(s["bytes"] for s in w.shards),
        },
    }
    write_index(out, meta)
    return meta


def run_ours(
    path: Path,
    workers: int,
    seq_len: int,
    batch: int,
    max_tokens: int,
    verify: bool = True,
    on_error: str = "raise",
) -> tuple[float, float]:
    src = ShardSource.open(str(path), seed=0, shuffle_buffer=1000, verify=verify, on_error=on_error)
    assert src.verify == verify, "the generated shards carry no checksums"
    ld = ShardLoader(src, seq_len=seq_len, batch_size=batch, rank=0, world=1, num_workers=workers)
    return _timed((b["tokens"].shape[0] * seq_len for b in ld), max_tokens)


def verify_cost(path: Path, seq_len: int, batch: int, tokens: int) -> dict[str, float]:
    """Best tokens/s of 3 interleaved runs each: verification off, on, on with on_error=skip."""
    kinds = {"off": {"verify": False}, "on": {}, "on, on_error=skip": {"on_error": "skip"}}
    best = dict.fromkeys(kinds, 0.0)
    for _ in range(3):
        for name, kw in kinds.items():
            tps, _ = run_ours(path, 0, seq_len, batch, tokens, **kw)
            best[name] = max(best[name], tps)
    return best


def run_wds(urls: list[str], workers: int) -> tuple[float, float]:
    import webdataset as wds  # lazy: the optional `bench` extra, and seconds to import

    ds = (
        wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker
        )
        .decode()
        .to_tuple("tokens.npy")
    )
    it = (
        ds
        if workers == 0
        else torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    )
    return _timed((len(arr) for (arr,) in it), None)


def _timed(counts: Iterator[int], max_tokens: int | None) -> tuple[float, float]:
    """(tokens/s after the first item, seconds to the first item: worker start-up)."""
    t0 = time.perf_counter()
    n = next(counts)
    t1 = time.perf_counter()
    n = 0
    for k in counts:
        n += k
        if max_tokens is not None and n >= max_tokens:
            break
    return n / (time.perf_counter() - t1), t1 - t0


def run_cat(urls: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *urls], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="size of the generated shards")
    ap.add_argument("--mean-tokens", type=int, default=8192, help="mean document length")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--long-seqs", type=int, default=8, help="2M-token sequences to time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mnemo-bench-") as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        meta = make_shards(out, args.mb, args.mean_tokens)
        tot = meta["totals"]
        urls = [str(out / s["name"]) for s in meta["shards"]]
        print(
            f"wrote {tot['shards']} shards, {tot['bytes'] / 1e6:.0f} MB, {tot['samples']:,} "
            f"documents, {tot['tokens']:,} tokens in {time.perf_counter() - t0:.1f} s "
            f"(cpus: {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f})"
        )
        bytes_per_token = tot["bytes"] / tot["tokens"]
        cat_s = min(run_cat(urls) for _ in range(3))
        cat_tps = tot["tokens"] / cat_s
        print(f"cat (raw read ceiling): {tot['bytes'] / cat_s / 1e6:,.0f} MB/s")
        print("steady state after the first item; 'start' = seconds to the first item")
        head = f"{'reader':<34}{'workers':>8}{'Mtok/s':>9}{'MB/s':>7}{'vs wds':>8}{'vs cat':>8}"
        print(head + f"{'start':>7}")
        for workers in (0, 2):
            wds_tps, wds_start = run_wds(urls, workers)
            ours = run_ours(out, workers, args.seq_len, args.batch, tot["tokens"])
            off = run_ours(out, workers, args.seq_len, args.batch, tot["tokens"], verify=False)
            for name, (tps, start) in (
                ("plain webdataset (decode npy)", (wds_tps, wds_start)),
                (f"ours (shuffle+pack {args.seq_len}x{args.batch})", ours),
                ("ours, checksums not verified", off),
            ):
                print(
                    f"{name:<34}{workers:>8}{tps / 1e6:>9.1f}{tps * bytes_per_token / 1e6:>7.0f}"
                    f"{tps / wds_tps:>8.2f}{tps / cat_tps:>8.3f}{start:>7.2f}"
                )
        best = verify_cost(out, args.seq_len, args.batch, tot["tokens"] // 2)
        off = best.pop("off")
        for name, tps in best.items():
            print(
                f"crc32 verification {name}: {tps / 1e6:.1f} Mtok/s vs {off / 1e6:.1f} off, "
                f"on/off = {tps / off:.3f} (0 workers, best of 3)"
            )
        for workers in (0, 2):
            tps, start = run_ours(out, workers, MAX_SEQ_LEN, 1, args.long_seqs * MAX_SEQ_LEN)
            print(
                f"2,097,152-token packed sequence, {workers} workers: "
                f"{MAX_SEQ_LEN / tps:.3f} s per sequence ({tps / 1e6:.1f} Mtok/s; first after "
                f"{start:.2f} s)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
