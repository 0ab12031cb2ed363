"""The shard modules' pieces on their own: the sample order without token packing, the
train/eval shard split, the config-time path check and the public re-exports of data.shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import data.shards
from data import shard_index, shard_loader, shard_reader
from data.shard_format import ShardDataError
from data.shard_index import check_shard_path
from data.shard_order import SampleOrder, global_index, split_shards
from data.shard_reader import ShardSource
from tests._shards_testing import make_docs, write_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ds"), make_docs(40, seed=3))


def test_sample_order_is_the_document_order_of_the_token_stream(ds: Path) -> None:
    src = ShardSource.open(str(ds), seed=11, shuffle_buffer=6)
    order = SampleOrder([s.samples for s in src.shards], seed=11, shuffle_buffer=6)
    assert order.num_samples == src.num_docs
    for g in range(3 * src.num_docs):  # three epochs
        k, row = order.sample(g)
        table = np.load(str(src.shards[k].sidecar), allow_pickle=False)
        assert (src.shards[k].url, table["key"][row].decode()) == src.doc_key(g)


def test_sample_order_is_each_sample_once_per_epoch_moved_less_than_a_window() -> None:
    samples = [5, 0, 7, 3, 9]
    order = SampleOrder(samples, seed=2, shuffle_buffer=4)
    n = sum(samples)
    for e in range(3):
        seen = [order.sample(e * n + p) for p in range(n)]
        assert sorted(seen) == sorted((k, r) for k, c in enumerate(samples) for r in range(c))
    unshuffled = SampleOrder(samples, seed=2, shuffle_buffer=1)
    place = {unshuffled.sample(p): p for p in range(n)}
    assert all(abs(place[order.sample(p)] - p) < 4 for p in range(n))


def test_global_index_gives_every_sequence_to_one_rank_once() -> None:
    for world in (1, 2, 3):
        got = sorted(
            global_index(b, r, batch_size=4, rank=rank, world=world)
            for rank in range(world)
            for b in range(5)
            for r in range(4)
        )
        assert got == list(range(5 * 4 * world))


def test_split_shards_holds_out_a_fixed_disjoint_share() -> None:
    train, held = split_shards(10, "train", 0.25), split_shards(10, "eval", 0.25)
    assert len(held) == 3 and sorted(train + held) == list(range(10))
    assert split_shards(10, "train", 0.0) == list(range(10))
    with pytest.raises(ValueError, match="expected 'train' or 'eval'"):
        split_shards(10, "test", 0.25)
    with pytest.raises(ValueError, match="needs data.eval_fraction > 0"):
        split_shards(10, "eval", 0.0)
    with pytest.raises(ValueError, match="holds out 10 of 10 shard"):
        split_shards(10, "train", 0.95)


def test_check_shard_path(ds: Path, tmp_path: Path) -> None:
    assert check_shard_path(str(ds)) == 258
    assert check_shard_path(str(ds / "index.json"), 0.5) == 258
    n = len(json.loads((ds / "index.json").read_text())["shards"])
    assert check_shard_path(f"{ds}/shard-{{000000..{n - 1:06d}}}.tar") is None
    with pytest.raises(ValueError, match=r"2 of \d+ shard file\(s\) do not exist"):
        check_shard_path(f"{ds}/shard-{{000000..{n + 1:06d}}}.tar")
    with pytest.raises(ValueError, match="nope/index.json does not exist"):
        check_shard_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=f"holds out all {n} shard"):
        check_shard_path(str(ds), 1.0)
    (tmp_path / "index.json").write_text("{not json")
    assert check_shard_path(str(tmp_path)) is None  # the reader names what is wrong


def test_data_shards_reexports_the_modules_names() -> None:
    assert data.shards.ShardSource is shard_reader.ShardSource
    assert data.shards.ShardLoader is shard_loader.ShardLoader
    assert data.shards.PackedBatches is shard_loader.PackedBatches
    assert data.shards.build_shard_loader is shard_loader.build_shard_loader
    assert data.shards.Shard is shard_index.Shard
    assert data.shards.expand_urls is shard_index.expand_urls
    assert data.shards.index_url is shard_index.index_url
    assert data.shards.ShardDataError is ShardDataError
    assert sorted(data.shards.__all__) == sorted(
        n for n in vars(data.shards) if not n.startswith("_") and n != "annotations"
    )
