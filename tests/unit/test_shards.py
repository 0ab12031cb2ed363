"""Shard reader: order independent of ranks and workers, exact (elastic) resume, URL kinds,
bad data (raise names shard and key; skip masks and counts), held-out eval shards, 2M tokens."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import fsspec
import numpy as np
import pytest

import data
from data.packing import MAX_SEQ_LEN
from data.shard_format import CHECKSUM, CHUNK_BYTES, FORMAT, ShardDataError, write_index
from data.shard_loader import ShardLoader
from data.shard_reader import ShardSource
from data.shards import build_shard_loader  # the public module (data.sources names it)
from system.config import DataConfig
from tests._shards_testing import (
    check_epoch_once,
    flip_payload,
    make_docs,
    member_of,
    read_rows,
    write_dataset,
)

L, B = 64, 4


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    docs = make_docs(60, seed=1)
    return write_dataset(tmp_path_factory.mktemp("ds"), docs), docs


def _loader(
    path: str | Path,
    *,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    seed: int = 7,
    buffer: int = 8,
    on_error: str = "raise",
    seq_len: int = L,
    batch: int = B,
) -> ShardLoader:
    src = ShardSource.open(str(path), seed=seed, shuffle_buffer=buffer, on_error=on_error)
    return ShardLoader(
        src, seq_len=seq_len, batch_size=batch, rank=rank, world=world, num_workers=workers
    )


def _global(rows: list) -> list[tuple[int, list[int], list[int]]]:
    return sorted((s, t.tolist(), i.tolist()) for s, t, i in rows)


def test_one_epoch_exactly_once_with_workers(ds) -> None:
    path, docs = ds
    ld = _loader(path, workers=2)
    n = -(-ld.source.epoch_tokens // (B * L))
    check_epoch_once(read_rows(ld, n), ld.source, docs)


def test_order_is_independent_of_world_size_and_workers(ds) -> None:
    path, _ = ds
    n_seq = 48  # global sequences compared
    ref = _global(read_rows(_loader(path), n_seq // B))
    for world, workers in ((2, 0), (3, 2)):
        rows = []
        for rank in range(world):
            rows += read_rows(
                _loader(path, rank=rank, world=world, workers=workers), n_seq // (B * world)
            )
        assert _global(rows) == ref, f"world={world} workers={workers} changed the order"


def test_order_depends_on_seed_and_epoch(ds) -> None:
    path, _ = ds
    src = ShardSource.open(str(path), seed=7, shuffle_buffer=8)
    other = ShardSource.open(str(path), seed=8, shuffle_buffer=8)
    n = src.num_docs
    e0 = [src.doc_key(g)[1] for g in range(n)]
    e1 = [src.doc_key(n + g)[1] for g in range(n)]
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert e0 != [other.doc_key(g)[1] for g in range(n)]
    # A buffer of 1 keeps each shard's documents in written order: runs of consecutive keys.
    flat = ShardSource.open(str(path), seed=7, shuffle_buffer=1)
    keys = [int(flat.doc_key(g)[1]) for g in range(n)]
    breaks = sum(b != a + 1 for a, b in zip(keys, keys[1:]))
    assert breaks <= len(flat.shards) - 1


def test_resume_mid_epoch_is_exact(ds) -> None:
    path, _ = ds
    whole = _global(read_rows(_loader(path, workers=2), 12))
    first = _loader(path, workers=2)
    part = read_rows(first, 5)
    state = first.state_dict()
    assert state["token"] == 5 * B * L and state["epoch"] == 0
    assert json.loads(json.dumps(state)) == state  # checkpoints store it as JSON
    again = _loader(path, workers=2)
    again.load_state_dict(state)
    assert _global(part + read_rows(again, 7)) == whole


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_elastic_resume_2x2_to_1x3(ds) -> None:
    path, docs = ds
    ranks = [_loader(path, rank=r, world=2, workers=2) for r in range(2)]
    rows = read_rows(ranks[0], 6) + read_rows(ranks[1], 6)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict(), "ranks disagree on the global position"
    one = _loader(path, rank=0, world=1, workers=3)
    one.load_state_dict(state)
    rest = -(-(one.source.epoch_tokens - state["token"]) // (B * L))
    rows += read_rows(one, rest)
    check_epoch_once(rows, one.source, docs)


def test_resume_refuses_another_dataset(ds, tmp_path: Path) -> None:
    path, _ = ds
    other = write_dataset(tmp_path, make_docs(5, seed=9))
    state = _loader(path).state_dict()
    with pytest.raises(ValueError, match="dataset"):
        _loader(other).load_state_dict(state)


def test_url_kinds_read_the_same(ds) -> None:
    path, _ = ds
    ref = _global(read_rows(_loader(path), 6))
    mem = fsspec.filesystem("memory")
    for f in path.iterdir():
        mem.pipe(f"/mnemo-test/{f.name}", f.read_bytes())
    for url in (f"file://{path}", f"pipe:cat {path}/index.json", "memory://mnemo-test/"):
        assert _global(read_rows(_loader(url), 6)) == ref, url


def test_shard_pattern_without_index_scans_headers(ds) -> None:
    path, _ = ds
    n = len(list(path.glob("shard-*.tar")))
    pattern = f"{path}/shard-{{000000..{n - 1:06d}}}.tar"
    assert _global(read_rows(_loader(pattern), 6)) == _global(read_rows(_loader(path), 6))


def test_build_loader_dispatch_and_eval_split(ds) -> None:
    path, _ = ds
    cfg = DataConfig(
        source="shards", path=str(path), num_workers=1, shuffle_buffer=8, eval_fraction=0.25
    )
    kw = dict(seq_len=32, batch_size=2, rank=0, world=1, seed=3)
    train, ev = data.build_loader(cfg, **kw), data.build_loader(cfg, split="eval", **kw)
    batch = next(iter(train))
    assert batch["tokens"].shape == (2, 33) and batch["doc_ids"].shape == (2, 32)
    tr_urls = {s.url for s in train.source.shards}
    ev_urls = {s.url for s in ev.source.shards}
    assert not tr_urls & ev_urls and len(tr_urls | ev_urls) == len(list(path.glob("*.tar")))
    assert len(ev_urls) == -(-len(tr_urls | ev_urls) // 4)
    g = int(next(iter(ev))["doc_ids"][0, 0])
    assert ev.source.doc_key(g)[0] in ev_urls
    with pytest.raises(ValueError, match="eval_fraction"):
        data.build_loader(DataConfig(source="shards", path=str(path)), split="eval", **kw)


def test_two_million_token_sequences(tmp_path: Path) -> None:
    docs = make_docs(40, seed=2, max_len=110_000)
    path = write_dataset(tmp_path, docs, shard_size="1MB")
    ld = _loader(path, seq_len=MAX_SEQ_LEN, batch=1, buffer=16)
    n = -(-ld.source.epoch_tokens // MAX_SEQ_LEN)
    check_epoch_once(read_rows(ld, n), ld.source, docs)


# ---------------------------------------------------------------------------------------------
# Bad data


def _copy(ds, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ds[0], dst)
    return dst


def _read_epoch(path: Path, on_error: str, workers: int = 0) -> tuple[list, ShardLoader]:
    ld = _loader(path, on_error=on_error, workers=workers)
    n = -(-ld.source.epoch_tokens // (B * L))
    rows, masks = [], []
    for batch in islice(ld, n):
        rows.append(batch["tokens"].numpy())
        masks.append(
            batch["loss_mask"].numpy() if "loss_mask" in batch else np.ones((B, L), np.float32)
        )
    return [np.concatenate(rows), np.concatenate(masks)], ld


def _check_raise_and_skip(
    path: Path, clean: Path, shard: Path, key: str, what: str, n_bad: int = 1, workers: int = 0
) -> None:
    with pytest.raises(ShardDataError, match=what) as err:
        _read_epoch(path, "raise", workers)
    assert str(shard) in str(err.value) and key in str(err.value), str(err.value)
    assert "data.on_error=skip" in str(err.value)
    (tok, mask), ld = _read_epoch(path, "skip", workers)
    assert ld.info.skipped_samples == n_bad
    named = [(x["shard"], x["key"]) for x in ld.info.skipped_examples]
    assert (str(shard), key) in named and len(named) == min(n_bad, 10), named
    (ref, _), _ = _read_epoch(clean, "skip")
    tok, ref = tok[:, 1:], ref[:, 1:]  # loss_mask[t] weighs the target tokens[t + 1]
    assert (mask == 0).any()
    assert np.array_equal(tok[mask == 1], ref[mask == 1]), "good data changed around a skip"
    assert (tok[mask == 0] == ld.source.sep_id).all()


def test_corrupt_member_header(ds, tmp_path: Path) -> None:
    path = _copy(ds, tmp_path)
    shard, key, member, _, _ = member_of(path, 1, 0)
    with open(shard, "r+b") as f:
        f.seek(member + 3)
        f.write(b"\xff\xfe")
    _check_raise_and_skip(path, ds[0], shard, key, "checksum")


def test_truncated_shard(ds, tmp_path: Path) -> None:
    path = _copy(ds, tmp_path)
    tables = {p: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.idx.npy"))}
    side, table = next((p, t) for p, t in tables.items() if len(t) >= 2)
    shard = side.with_name(side.name.replace(".idx.npy", ".tar"))
    cut = int(table["data"][1]) + 10
    with open(shard, "r+b") as f:
        f.truncate(cut)
    n_bad = int((table["data"] + 2 * table["ntok"] > cut).sum())
    key = table["key"][1].decode()
    _check_raise_and_skip(path, ds[0], shard, key, "truncated", n_bad=n_bad, workers=2)


def test_wrong_dtype_in_place(ds, tmp_path: Path) -> None:
    path = _copy(ds, tmp_path)
    shard, key, member, data, _ = member_of(path, 0, 0)
    blob = bytearray(shard.read_bytes())
    i = blob.index(b"'descr': '<u2'", member)
    assert i < data
    blob[i : i + 14] = b"'descr': '<i2'"
    shard.write_bytes(bytes(blob))
    _check_raise_and_skip(path, ds[0], shard, key, "dtype int16; expected uint16")


def _hand_tar(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            ti = tarfile.TarInfo(f"{key}.tokens.npy")
            ti.size = len(buf.getvalue())
            tar.addfile(ti, io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (np.arange(40, dtype=np.float32), "dtype float32; expected uint16"),
        (np.full(40, 60000, dtype=np.uint16), "token id 60000 >= vocab_size 258"),
    ],
)
def test_foreign_shards_with_bad_samples(tmp_path: Path, bad: np.ndarray, what: str) -> None:
    arrays = {f"s{k}": np.arange(30 + k, dtype=np.uint16) % 256 for k in range(6)}
    arrays["s3"] = bad
    _hand_tar(tmp_path / "a.tar", arrays)
    with pytest.raises(ShardDataError, match=what) as err:
        list(islice(_loader(tmp_path / "a.tar", seq_len=16), 20))
    assert "a.tar" in str(err.value) and "'s3'" in str(err.value)
    ld = _loader(tmp_path / "a.tar", seq_len=16, on_error="skip")
    n = -(-ld.source.epoch_tokens // (B * 16))
    batches = list(islice(ld, n))
    assert ld.info.skipped_samples == 1
    assert sum("loss_mask" in b for b in batches) >= 1


def test_not_a_tar(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"hello, not a tar file" * 40)
    with pytest.raises(ShardDataError, match="x.tar.*not a readable tar"):
        ShardSource.open(str(tmp_path / "x.tar"), seed=0)


def test_missing_dataset_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no index.json"):
        ShardSource.open(str(tmp_path), seed=0)


def test_checksum_catches_in_vocab_corruption(ds, tmp_path: Path) -> None:
    path = _copy(ds, tmp_path)
    shard, key, _, data, ntok = member_of(path, 1, 0)
    flip_payload(shard, data, ntok // 2)
    with pytest.raises(ShardDataError, match=r"crc32 .*expected [0-9a-f]{8}, got [0-9a-f]{8}"):
        _read_epoch(path, "raise")
    _check_raise_and_skip(path, ds[0], shard, key, "checksum mismatch", workers=2)


def test_checksum_catches_corruption_deep_inside_a_long_document(tmp_path: Path) -> None:
    docs = make_docs(6, seed=4, max_len=40_000)
    docs[2] = docs[2] + b"q" * 30_000  # > 3 checksum chunks, read in many 64-token slices
    path = write_dataset(tmp_path / "long", docs, shard_size="1MB")
    clean = write_dataset(tmp_path / "clean", docs, shard_size="1MB")
    table = np.load(path / "shard-000000.idx.npy", allow_pickle=False)
    row = int(np.argmax(table["ntok"]))
    shard, key, _, data, ntok = member_of(path, 0, row)
    assert 2 * ntok > 3 * CHUNK_BYTES
    flip_payload(shard, data, ntok - 100)  # in the last chunk, far from the document's start
    _check_raise_and_skip(path, clean, shard, key, "checksum mismatch")


def test_skipped_samples_are_named_in_the_log(tmp_path: Path, caplog) -> None:
    arrays = {f"s{k:02d}": np.arange(30 + k, dtype=np.uint16) % 256 for k in range(20)}
    bad = [f"s{k:02d}" for k in range(1, 20, 4)] + [f"s{k:02d}" for k in range(2, 20, 2)]
    bad = sorted(set(bad))
    for k in bad:
        arrays[k] = np.full(25, 60000, dtype=np.uint16)
    _hand_tar(tmp_path / "a.tar", arrays)
    ld = _loader(tmp_path / "a.tar", seq_len=16, on_error="skip", workers=2)
    n = ld.source.epoch_tokens // (B * 16)  # within epoch 0
    src, start, n_bad = ld.source, 0, 0
    for g in range(src.num_docs):  # bad documents that start in the tokens read
        n_bad += src.doc_key(g)[1] in bad and start < n * B * 16
        start += src.length(g) + 1
    with caplog.at_level("WARNING", logger="data.shards"):
        list(islice(ld, n))
    assert ld.info.skipped_samples == n_bad > 10
    ex = ld.info.skipped_examples
    assert len(ex) == 10 and {x["key"] for x in ex} < set(bad)
    assert all(x["shard"] == str(tmp_path / "a.tar") and "vocab_size" in x["reason"] for x in ex)
    lines = [r.getMessage() for r in caplog.records if r.name == "data.shards"]
    named = [m for m in lines if "skipped sample" in m]
    assert len(named) == 10 and all(str(tmp_path / "a.tar") in m for m in named), lines
    assert any("the rest are only counted" in m for m in lines), lines


def _as_version_1(path: Path) -> None:
    """What a dataset written before checksums looks like: version 1, no .crc.npy files."""
    meta = json.loads((path / "index.json").read_text())
    meta["version"] = 1
    meta.pop("checksum")
    for s in meta["shards"]:
        (path / s.pop("checksums")).unlink()
    (path / "index.json").write_text(json.dumps(meta))


def test_datasets_without_checksums_still_read(ds, tmp_path: Path) -> None:
    path, docs = _copy(ds, tmp_path), ds[1]
    _as_version_1(path)
    ld = _loader(path, workers=2)
    assert not ld.source.verify
    check_epoch_once(read_rows(ld, -(-ld.source.epoch_tokens // (B * L))), ld.source, docs)
    shard, _, _, data, ntok = member_of(path, 1, 0)
    flip_payload(shard, data, ntok // 2)
    _read_epoch(path, "raise")  # nothing to verify against: reads as written


def test_unknown_index_version_is_refused(ds, tmp_path: Path) -> None:
    path = _copy(ds, tmp_path)
    meta = json.loads((path / "index.json").read_text())
    meta["version"] = 99
    (path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"index.json.*version 99.*expected 1 or 2"):
        ShardSource.open(str(path), seed=0)
    meta["version"] = 2
    meta["shards"][0].pop("checksums")
    (path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shard-000000.tar.*no 'checksums'"):
        ShardSource.open(str(path), seed=0)


def test_verification_off_reads_the_same(ds) -> None:
    path, _ = ds
    on = _global(read_rows(_loader(path), 8))
    src = ShardSource.open(str(path), seed=7, shuffle_buffer=8, verify=False)
    off = ShardLoader(src, seq_len=L, batch_size=B, rank=0, world=1)
    assert _global(read_rows(off, 8)) == on


def test_empty_dataset_fails_at_construction_naming_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write_index(
        empty,
        {"format": FORMAT, "version": 2, "kind": "tokens", "vocab_size": 258, "sep_id": 256,
         "dtype": "uint16", "shards": [], "checksum": CHECKSUM},
    )  # fmt: skip
    with tarfile.open(tmp_path / "none.tar", "w"):
        pass  # a valid tar with no members
    kw = dict(seq_len=16, batch_size=2, rank=0, world=1, seed=0)
    for p, where in ((empty, empty / "index.json"), (tmp_path / "none.tar", tmp_path / "none.tar")):
        with pytest.raises(ValueError, match="no documents") as err:
            build_shard_loader(DataConfig(source="shards", path=str(p)), **kw)
        assert str(where) in str(err.value), str(err.value)
