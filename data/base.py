"""The loader contract every data source follows, so the trainer and checkpoints need no
per-source code.

A source yields *global* samples: sample `i` of epoch `e` is a pure function of
(seed, epoch, i) and of nothing about the cluster. Rank `r` of `world` takes the samples with
`i % world == r` (and DataLoader workers split a rank's share the same way), so the union over
ranks is the global sequence with nothing lost or repeated. A loader's `state_dict()` is a
*global* position (identical on every rank after a lockstep step), hence it resumes on any
world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class LoaderInfo:
    """Facts a loader reports to the trainer's metrics."""

    skipped_samples: int = 0
    # The first few skipped samples by name (shard, key, reason), so a count can be chased
    # down; the shard loader keeps (and logs) the first 10, then only counts.
    skipped_examples: list[dict[str, str]] = field(default_factory=list)


class BatchLoader(Protocol):
    """What `data.build_loader` returns: iterate batches, checkpoint the position.

    Each batch is a dict with at least `tokens`: LongTensor (B, seq_len + 1); inputs are
    `tokens[:, :-1]`, targets `tokens[:, 1:]`. Optional keys: `loss_mask` (B, seq_len) float,
    `doc_ids` (B, seq_len) int for document boundaries in packed sequences.
    """

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    def info(self) -> LoaderInfo: ...


class IndexedBatchDataset(torch.utils.data.IterableDataset):
    """Batches of a source whose sample `i` is a pure function of `i` (synthetic, text windows).

    Rank-local sample j is global sample `start + j * world + rank`. DataLoader workers take
    whole rank-local batches round-robin (worker w: batches w, w + n, ...), which is the order
    in which a DataLoader hands them back, so the consumed prefix is always contiguous and the
    position is one integer.
    """

    def __init__(
        self,
        sample_fn: Any,
        *,
        batch_size: int,
        rank: int,
        world: int,
        start: int = 0,
    ) -> None:
        super().__init__()
        self.sample_fn = sample_fn
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.start = start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = wid
        while True:
            local = range(b * self.batch_size, (b + 1) * self.batch_size)
            samples = [self.sample_fn(self.start + j * self.world + self.rank) for j in local]
            yield collate(samples)
            b += nw


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack per-sample numpy / tensor fields into a batch (tokens become int64)."""
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        vals = [torch.as_tensor(s[key]) for s in samples]
        t = torch.stack(vals)
        out[key] = t.long() if key in ("tokens", "doc_ids") else t
    return out


class IndexedLoader:
    """BatchLoader over an IndexedBatchDataset; the state is the next global sample index."""

    def __init__(
        self,
        sample_fn: Any,
        *,
        batch_size: int,
        rank: int,
        world: int,
        num_workers: int = 0,
    ) -> None:
        self.sample_fn = sample_fn
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.num_workers = num_workers
        self.next_index = 0
        self._info = LoaderInfo()

    @property
    def info(self) -> LoaderInfo:
        return self._info

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = IndexedBatchDataset(
            self.sample_fn,
            batch_size=self.batch_size,
            rank=self.rank,
            world=self.world,
            start=self.next_index,
        )
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers else None,
        )
        for batch in loader:
            # Every rank consumes one batch in lockstep: the global position moves by B * world.
            self.next_index += self.batch_size * self.world
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "next_index" not in state:
            raise ValueError(f"loader state {state!r} has no 'next_index'")
        self.next_index = int(state["next_index"])
