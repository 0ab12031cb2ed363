"""Shard reader under a real gloo process group: 2 ranks x 2 DataLoader workers read one epoch,
their shares are disjoint and complete; a run stopped mid-epoch resumes on 1 rank x 3 workers
and, with what the 2 ranks read before the stop, sees every document exactly once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data.shards import build_shard_loader
from system.config import DataConfig
from tests._shards_testing import check_epoch_once, make_docs, read_rows, write_dataset

L, B, SEED, STOP = 48, 3, 11, 5  # STOP: lockstep steps before the simulated interruption


def _cfg(path: str, workers: int) -> DataConfig:
    return DataConfig(source="shards", path=path, num_workers=workers, shuffle_buffer=8)


def _rank(rank: int, world: int, path: str, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        ld = build_shard_loader(
            _cfg(path, 2), seq_len=L, batch_size=B, rank=rank, world=world, seed=SEED
        )
        before = read_rows(ld, STOP)
        state = ld.state_dict()
        n_epoch = math.ceil(ld.source.epoch_tokens / (B * L * world))
        after = read_rows(ld, n_epoch - STOP)
        rows = [None] * world
        states = [None] * world
        dist.all_gather_object(rows, before + after)
        dist.all_gather_object(states, state)
        if rank == 0:
            assert all(s == states[0] for s in states), f"ranks disagree: {states}"
            mine = [{r[0] for r in part} for part in rows]
            assert not mine[0] & mine[1], "two ranks read the same sequence"
            docs = make_docs(60, seed=5)
            check_epoch_once([r for part in rows for r in part], ld.source, docs)
        before_all = [None] * world
        dist.all_gather_object(before_all, [(s, t.tolist(), i.tolist()) for s, t, i in before])
        if rank == 0:
            out = {"state": state, "before": [r for part in before_all for r in part]}
            Path(tmp, "stopped.json").write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_gloo_ranks_disjoint_complete_then_elastic_resume(tmp_path: Path) -> None:
    docs = make_docs(60, seed=5)
    path = str(write_dataset(tmp_path / "ds", docs))
    mp.spawn(_rank, args=(2, path, str(tmp_path)), nprocs=2, join=True)
    stopped = json.loads((tmp_path / "stopped.json").read_text())
    assert stopped["state"]["token"] == STOP * B * L * 2
    one = build_shard_loader(_cfg(path, 3), seq_len=L, batch_size=B, rank=0, world=1, seed=SEED)
    one.load_state_dict(stopped["state"])
    rest = math.ceil((one.source.epoch_tokens - one.token) / (B * L))
    rows = [(s, np.array(t), np.array(i)) for s, t, i in stopped["before"]]
    rows += read_rows(one, rest)
    check_epoch_once(rows, one.source, docs)
    assert torch.equal(
        torch.tensor([r[0] for r in rows]).sort().values, torch.arange(len(rows)) * L
    )
