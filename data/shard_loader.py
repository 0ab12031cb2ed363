"""One rank's packed batches of token shards, and the resumable loader that hands them out.

Split. Rank r of `world` takes global sequences i = r, r + world, ... (data/shard_order.py);
its DataLoader workers take whole rank-local batches round-robin (the order a DataLoader
returns them). No sample is lost or repeated, and nothing depends on world size or worker
count. Workers are forked (they run numpy and file reads only) and send int32 tokens, widened
to int64 on arrival.

Resume. `state_dict()` is the global token position T of the next unread sequence (identical
on every rank after a lockstep step; also given as epoch, document, offset). Any world size,
worker count, batch size or seq_len resumes from T.

Bad data. `on_error="raise"` stops at the first unreadable document with the shard and key
named; `"skip"` masks its span out of the loss (the layout stays identical on every rank),
counts it once in `info.skipped_samples` and names the first 10 per loader (shard, key,
reason) in `info.skipped_examples` and in a warning on the `data.shards` logger.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data.base import LoaderInfo
from data.packing import check_seq_len, pack_into
from data.shard_order import global_index
from data.shard_reader import ShardSource

if TYPE_CHECKING:
    from collections.abc import Iterator

    from data.config import DataConfig

_NAMED_SKIPS = 10  # skipped samples a loader names (log + info.skipped_examples); then counts
# The logger of the shards' public module (data.shards), where users and log filters look.
log = logging.getLogger("data.shards")


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
            g = global_index(b, r, batch_size=n, rank=self.rank, world=self.world)
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
