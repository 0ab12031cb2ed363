"""Sharded, atomic checkpoints under RUN_DIR/checkpoints/step_<8 digits>/.

Layout of one checkpoint:
    dcp/                 model + optimizer, DCP shards (ddp, fsdp): reshardable to any world size
    ds/                  DeepSpeed engine checkpoint (deepspeed)
    rng_rank<r>.pt       python / numpy / torch RNG states of rank r (tensors and ints only)
    trainer_state.json   step, tokens, LR schedule, loader position, strategy, world size
    COMMITTED            written last by rank 0 after every rank finished (a barrier)
A directory without COMMITTED is an interrupted save and is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from system import faults
from system.dist import barrier

if TYPE_CHECKING:
    from data.base import BatchLoader
    from system.config import JobConfig
    from system.dist import DistEnv
    from system.strategies.base import Strategy

COMMITTED = "COMMITTED"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def committed_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [d for d in root.glob("step_*") if d.is_dir() and (d / COMMITTED).exists()]
    return sorted(dirs, key=lambda d: int(d.name.split("_")[1]))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint file {path} is not valid JSON ({e})") from None


class Checkpointer:
    """Saves and restores the full training state of every rank."""

    def __init__(self, cfg: JobConfig, env: DistEnv, run_dir: Path) -> None:
        self.cfg = cfg
        self.env = env
        self.run_dir = Path(run_dir)
        self._latest: Path | None = None
        found = committed_checkpoints(self.run_dir)
        self._latest = found[-1] if found else None

    def latest(self) -> Path | None:
        return self._latest

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return step == self.cfg.train.steps or (every > 0 and step % every == 0)

    # -- save ---------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        strategy: Strategy,
        loader: BatchLoader,
        train_state: dict[str, Any],
        metrics: dict[str, Any] | None = None,
    ) -> Path:
        d = step_dir(self.run_dir, step)
        if self.env.rank == 0:
            if d.exists():  # a leftover of an interrupted save of this step
                shutil.rmtree(d)
            d.mkdir(parents=True)
        barrier(self.env.world)
        self._save_model(d, strategy)
        torch.save(_rng_state(), d / f"rng_rank{self.env.rank}.pt")
        faults.maybe_fail(step, self.env.rank, self.run_dir, point="save")
        barrier(self.env.world)
        if self.env.rank == 0:
            meta = {
                "step": step,
                "train_state": train_state,
                "scheduler": _json_safe(strategy.scheduler.state_dict()),
                "loader": loader.state_dict(),
                "strategy": strategy.name,
                "world_size": self.env.world,
                "model": self.cfg.model.name,
                "model_args": self.cfg.model.args,
                "metrics": metrics or {},
            }
            (d / "trainer_state.json").write_text(json.dumps(meta, indent=2))
            tmp = d / (COMMITTED + ".tmp")
            tmp.write_text(f"{step}\n")
            os.replace(tmp, d / COMMITTED)
            self._prune()
        barrier(self.env.world)
        self._latest = d
        return d

    def _save_model(self, d: Path, strategy: Strategy) -> None:
        if strategy.name == "deepspeed":
            strategy.engine.save_checkpoint(str(d / "ds"), tag="state", save_latest=False)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(strategy.module, strategy.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(d / "dcp"))

    def _prune(self) -> None:
        done = committed_checkpoints(self.run_dir)
        for old in done[: max(0, len(done) - self.cfg.checkpoint.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def finalize(self) -> None:
        """Wait for in-flight saves (a seam for async saving)."""
        barrier(self.env.world)

    # -- restore ------------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        r = self.cfg.resume
        if r == "never":
            return None
        if r == "auto":
            return self._latest
        p = Path(r)
        if not (p / COMMITTED).exists():
            raise FileNotFoundError(
                f"--resume {r}: {p / COMMITTED} does not exist (not a committed checkpoint)"
            )
        return p

    def restore(self, strategy: Strategy, loader: BatchLoader) -> dict[str, Any] | None:
        """Load the checkpoint `--resume` names into strategy and loader; None if there is none."""
        d = self.resume_path()
        if d is None:
            return None
        meta = _load_json(d / "trainer_state.json")
        if meta["strategy"] != strategy.name:
            raise ValueError(
                f"checkpoint {d} was written by strategy {meta['strategy']!r}; this run uses "
                f"{strategy.name!r}"
            )
        self._load_model(d, strategy, meta)
        strategy.scheduler.load_state_dict(meta["scheduler"])
        loader.load_state_dict(meta["loader"])
        rng = d / f"rng_rank{self.env.rank}.pt"
        if rng.exists() and meta["world_size"] == self.env.world:
            _set_rng_state(torch.load(rng, weights_only=True))
        if self.env.rank == 0:
            print(f"[mnemo] resumed from {d} (step {meta['step']})", flush=True)
        return meta["train_state"]

    def _load_model(self, d: Path, strategy: Strategy, meta: dict[str, Any]) -> None:
        if strategy.name == "deepspeed":
            path, _ = strategy.engine.load_checkpoint(str(d / "ds"), tag="state")
            if path is None:
                raise FileNotFoundError(
                    f"DeepSpeed checkpoint under {d / 'ds'} could not be loaded"
                )
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(strategy.module, strategy.optimizer)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(d / "dcp"))
        set_state_dict(
            strategy.module,
            strategy.optimizer,
            model_state_dict=sd["model"],
            optim_state_dict=sd["optim"],
        )


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, int | float | str | bool) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return None  # callables (LambdaLR's lambdas) are rebuilt from the config
