"""Token shards as a deterministic, resumable, world-size-free stream of packed sequences.

The `shards` source (`data.shards:build_shard_loader`, data/sources.py), in modules by idea:

- data/shard_index.py: which shards a data.path names (index.json or a shard pattern), and
  the config-time path check;
- data/shard_order.py: the global order by (seed, epoch), bounded-shuffle windows, locating a
  token position, the rank split and the held-out eval shards;
- data/shard_reader.py: `ShardSource`, ranged reads of document slices with header, checksum
  and vocabulary checks, and the bookkeeping of skipped documents;
- data/shard_loader.py: `PackedBatches` and `ShardLoader` (DataLoader workers, resume state,
  skipped samples counted and named) and `build_shard_loader`.

The on-disk format itself is data/shard_format.py. This module keeps the public names in one
place; it imports torch (through the loader), so torch-free code imports data.shard_index.
"""

from __future__ import annotations

from data.shard_format import ShardDataError
from data.shard_index import Shard, expand_urls, index_url
from data.shard_loader import PackedBatches, ShardLoader, build_shard_loader
from data.shard_reader import ShardSource

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
