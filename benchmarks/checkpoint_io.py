"""Checkpoint I/O: our sharded checkpoint vs torch.save / torch.load of the full state.

State: transformer-170m with 16 layers (209.6M parameters) + AdamW moments, fp32 (~2.5 GB).
  ours      2 CPU ranks (gloo), FSDP2, `Checkpointer.save` / `.restore`: DCP shards + fsync +
            sha256 manifest + commit; restore verifies every hash, then DCP-loads in place.
  raw DCP   the same 2 ranks, `dcp.save` / `dcp.load` alone (no manifest, no commit).
  baseline  1 process, `torch.save({"model", "optim"})` / `torch.load(weights_only=True)`.
Async: the Checkpointer with checkpoint.async_save=true; the stall is how long `save()` blocks
the step loop (the copy into cached CPU buffers), as a fraction of a synchronous save. Goal:
<= 10%. Steps are synthetic (gradients set, AdamW step): the optimizer's memory traffic is what
competes with the writer thread. Ratios < 1 mean ours is faster. The CPU may be shared: each
timing is the best of `--repeats`.

    .venv/bin/python benchmarks/checkpoint_io.py [--layers 16] [--repeats 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import models  # noqa: E402
from system import config as C  # noqa: E402
from system.checkpoint import Checkpointer  # noqa: E402
from system.dist import DistEnv, seed_all  # noqa: E402
from system.strategies import build_strategy  # noqa: E402


def job_config(run_dir: Path, layers: int, async_save: bool, resume: str) -> C.JobConfig:
    cfg = C.smoke_base()
    return C.apply_overrides(
        cfg,
        {
            "run_dir": str(run_dir),
            "resume": resume,
            "model.name": "transformer-170m",
            "model.args": {"n_layers": layers},
            "scaling.strategy": "fsdp",
            "scaling.workers": 2,
            "train.steps": 1000,
            "train.seq_len": 16,
            "train.batch_tokens": 32,
            "train.micro_batch": 1,
            "checkpoint.keep": 1,
            "checkpoint.async_save": async_save,
        },
    )


def fake_step(strategy: Any) -> None:
    """What a training step does to the state: new gradients, an AdamW update in place."""
    for p in strategy.module.parameters():
        p.grad = p.detach() * 1e-3
    strategy.optimizer.step()
    strategy.scheduler.step()
    strategy.optimizer.zero_grad(set_to_none=True)


def build(cfg: C.JobConfig, env: DistEnv) -> tuple[Any, Any]:
    seed_all(0)
    model = models.build(cfg.model.name, **cfg.model.args)
    model.block_attr = "layers"
    strategy = build_strategy(cfg, model, env.device, env.world, 1)
    t = cfg.train
    loader = data.build_loader(
        cfg.data, seq_len=t.seq_len, batch_size=1, rank=env.rank, world=env.world, seed=0
    )
    return strategy, loader


def _timed(fn: Any) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def sharded_worker(rank: int, args: argparse.Namespace, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{args.tmp}/pg", rank=rank, world_size=2)
    torch.set_num_threads(1)
    env = DistEnv(rank, 2, rank, torch.device("cpu"), "torchrun")
    tmp = Path(args.tmp)
    res: dict[str, Any] = {}
    cfg = job_config(tmp / "sync", args.layers, async_save=False, resume="never")
    strategy, loader = build(cfg, env)
    fake_step(strategy)  # AdamW state exists from here on
    ckpt = Checkpointer(cfg, env, tmp / "sync")
    step = {"n": 1}

    def save() -> None:
        ckpt.save(step["n"], strategy, loader, {"step": step["n"], "tokens": 0})

    res["save_s"] = []
    for _ in range(args.repeats):
        res["save_s"].append(_timed(save))
        step["n"] += 1
    res["restore_s"] = []
    for _ in range(args.repeats):
        again = Checkpointer(
            job_config(tmp / "sync", args.layers, False, "auto"), env, tmp / "sync"
        )
        res["restore_s"].append(_timed(lambda c=again: c.restore(strategy, loader)))

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    res["dcp_save_s"], res["dcp_load_s"] = [], []
    for i in range(args.repeats):
        path = str(tmp / f"raw{i}")
        msd, osd = get_state_dict(strategy.module, strategy.optimizer)
        res["dcp_save_s"].append(
            _timed(lambda p=path, s={"model": msd, "optim": osd}: dcp.save(s, checkpoint_id=p))
        )
        msd, osd = get_state_dict(strategy.module, strategy.optimizer)
        sd = {"model": msd, "optim": osd}

        def load(p: str = path, sd: dict = sd) -> None:
            dcp.load(sd, checkpoint_id=p)
            set_state_dict(
                strategy.module,
                strategy.optimizer,
                model_state_dict=sd["model"],
                optim_state_dict=sd["optim"],
            )

        res["dcp_load_s"].append(_timed(load))

    # Async: saves every `gap` steps; before each, the previous one is committed (its wait,
    # if the writer has not finished yet, is back-pressure and timed apart from the stall).
    acfg = job_config(tmp / "async", args.layers, async_save=True, resume="never")
    actk = Checkpointer(acfg, env, tmp / "async")
    steps, stage, wait = [], [], []
    saves = tuple((i + 1) * args.gap for i in range(args.saves))  # steps before: baseline
    for n in range(1, saves[-1] + args.gap + 1):
        steps.append(_timed(lambda: fake_step(strategy)))
        if n in saves:
            wait.append(_timed(actk.commit_pending))
            state = {"step": n, "tokens": 0}
            stage.append(_timed(lambda n=n, st=state: actk.save(n, strategy, loader, st)))
    res["finalize_s"] = _timed(actk.finalize)
    res.update(async_block_s=stage, async_wait_s=wait, step_s=steps, saves_at=list(saves))
    res["gap"] = args.gap
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def single_worker(args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    seed_all(0)
    model = models.build("transformer-170m", n_layers=args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    for p in model.parameters():
        p.grad = p.detach() * 1e-3
    opt.step()
    path = Path(args.tmp) / "full.pt"
    res: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    res["save_s"], res["save_fsync_s"], res["load_s"] = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
        res["save_s"].append(time.perf_counter() - t0)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        res["save_fsync_s"].append(time.perf_counter() - t0)
        res["bytes"] = path.stat().st_size
        t0 = time.perf_counter()
        sd = torch.load(path, weights_only=True)
        res["load_s"].append(time.perf_counter() - t0)
        del sd
    Path(out).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="transformer-170m layers (16: 209.6M)")
    ap.add_argument("--repeats", type=int, default=2, help="timings are the best of these")
    ap.add_argument("--gap", type=int, default=8, help="steps between async saves")
    ap.add_argument("--saves", type=int, default=5, help="async saves (the first allocates)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    args.tmp = tempfile.mkdtemp(prefix="ckpt_io_", dir=args.dir)
    ctx = mp.get_context("spawn")
    try:
        sharded, single = Path(args.tmp) / "sharded.json", Path(args.tmp) / "single.json"
        t0 = time.perf_counter()
        mp.start_processes(
            sharded_worker, args=(args, str(sharded)), nprocs=2, start_method="spawn"
        )
        p = ctx.Process(target=single_worker, args=(args, str(single)))
        p.start()
        p.join()
        if p.exitcode:
            raise SystemExit(f"single-process baseline failed (exit {p.exitcode})")
        report(json.loads(sharded.read_text()), json.loads(single.read_text()), args)
        print(f"(benchmark wall time {time.perf_counter() - t0:.0f} s)")
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)


def report(s: dict[str, Any], b: dict[str, Any], args: argparse.Namespace) -> None:
    best = min
    print(
        f"state: {b['params'] / 1e6:.1f}M params + AdamW, {b['bytes'] / 2**30:.2f} GiB "
        f"(torch.save file); {os.cpu_count()} CPUs, times = best of {args.repeats}"
    )
    rows = [
        (
            "save",
            best(s["save_s"]),
            best(s["dcp_save_s"]),
            best(b["save_s"]),
            best(b["save_fsync_s"]),
        ),
        ("load", best(s["restore_s"]), best(s["dcp_load_s"]), best(b["load_s"]), None),
    ]
    print(
        f"{'':6}{'ours (2 ranks)':>16}{'raw DCP':>10}{'torch (1 proc)':>16}{'+fsync':>9}"
        f"{'ours/torch':>12}{'DCP/torch':>11}"
    )
    for name, ours, raw, base, fs in rows:
        fs_txt = f"{fs:8.2f}s" if fs is not None else f"{'-':>9}"
        ratios = f"{ours / base:12.2f}{raw / base:11.2f}"
        print(f"{name:6}{ours:15.2f}s{raw:9.2f}s{base:15.2f}s{fs_txt}{ratios}")
    sync = best(s["save_s"])
    blocks = s["async_block_s"]
    saves = set(s["saves_at"])
    first = min(saves)
    plain = s["step_s"][1 : first - 1]  # before any save, minus the first (warm-up) step
    during = [
        t for i, t in enumerate(s["step_s"], start=1) if any(1 <= i - k <= s["gap"] for k in saves)
    ]
    base_step = statistics.median(plain) if plain else float("nan")
    print(
        f"async save: save() blocks {', '.join(f'{x:.2f}' for x in blocks)} s "
        f"(first allocates the CPU buffers; later ones reuse them); sync save {sync:.2f} s"
    )
    waits = ", ".join(f"{x:.2f}" for x in s["async_wait_s"])
    print(f"  wait for the previous async save before the next ({s['gap']} steps later): {waits} s")
    print(
        f"  stall / sync save: first {blocks[0] / sync:.1%}; later ones median "
        f"{statistics.median(blocks[1:]) / sync:.1%} (min {min(blocks[1:]) / sync:.1%}, "
        f"max {max(blocks[1:]) / sync:.1%}); goal <= 10%; finalize {s['finalize_s']:.2f} s"
    )

    print(
        f"  step time {base_step:.3f} s without a save in flight, "
        f"{statistics.median(during):.3f} s median while one writes "
        f"(writer thread and optimizer share the CPUs)"
    )


if __name__ == "__main__":
    main()
