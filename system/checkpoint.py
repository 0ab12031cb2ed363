"""Sharded, atomic checkpoints of the full training state (layout: system/ckpt_files.py).

Crash safety: a directory without COMMITTED is never resumed from; COMMITTED is written by
rank 0 after a barrier that every rank reaches only once its shards and manifest are on disk;
old checkpoints are deleted only after a newer one committed (COMMITTED removed first, so a
half-deleted one is never resumable). A save killed at any point leaves the previous one usable.
Each rank fsyncs its files before the barrier, so COMMITTED also means on disk.

Async (`checkpoint.async_save`, DCP only): `save` copies the state into CPU buffers reused
across saves and returns; a background thread writes the shards (over its own gloo group, so
its collectives never interleave with the loop's) and hashes them. The checkpoint is committed
and reported at the next `save` or at `finalize`, once every rank's write finished: after a
crash the newest *committed* checkpoint may be one interval older. Old checkpoints are renamed
away at once and deleted by a background thread. DeepSpeed saves synchronously (its own
decoupled / Nebula checkpoint engines are not wired up here).

Resume: `auto` = newest committed of the run dir; `never` = start fresh, moving an earlier
run's checkpoints aside; `PATH` = that checkpoint, unless the run dir already holds a newer one
(a restart after a crash must continue, not go back). PATH may be another run's checkpoint
(fine-tuning, branching): the run continues from its state and writes only to its own run dir;
it is checked with `ckpt_files.diagnose`, the diagnosis `mnemo ckpt inspect` prints. Under
torchrun `--max-restarts` and Ray Train's FailureConfig a restarted worker resumes by itself
from the run dir; Ray's checkpoint object is not needed. On another world size, DCP
reshards; DeepSpeed converts to a universal checkpoint once; RNG streams re-seed from
(train.seed, step, rank) since per-rank streams of another partition of the work have no
meaning here.

Ray Train: every commit is reported with `ray.train.report(..., checkpoint_upload_mode=
NO_UPLOAD)` from all ranks (the launcher makes RUN_DIR/checkpoints Ray's experiment dir, so
nothing is copied) and Ray's CheckpointConfig(num_to_keep) deletes the checkpoints it knows;
elsewhere `checkpoint.keep` prunes here. Ray cannot count a checkpoint it never heard of: one
whose report died with a killed worker, or one written without Ray (torchrun) in the same run
dir. Those "orphans" are pruned here, so that at every commit no more than `keep` committed
checkpoints remain (see `_prune_under_ray`); the ones Ray will delete are un-committed here at
once, so a half-deleted one is never resumable under Ray either.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from system import faults
from system.ckpt_files import (
    COMMITTED,
    MANIFEST,
    TRAINER_STATE,
    UNIVERSAL,
    CheckpointError,
    all_checkpoints,
    committed_checkpoints,
    dcp_load,
    deepspeed_safe_load,
    fsync_dir,
    is_done,
    load_json,
    load_pt,
    merge_manifests,
    named_step,
    quiet_single_process,
    resume_target,
    step_dir,
    step_of,
    to_universal,
    uncommit,
    verify,
    write_atomic,
    write_rank_manifest,
)
from system.dist import barrier, seed_all

if TYPE_CHECKING:
    from data.base import BatchLoader
    from system.config import JobConfig
    from system.dist import DistEnv
    from system.strategies.base import Strategy

__all__ = [
    "COMMITTED",
    "MANIFEST",
    "TRAINER_STATE",
    "UNIVERSAL",
    "CheckpointError",
    "Checkpointer",
    "all_checkpoints",
    "committed_checkpoints",
    "load_json",
    "load_pt",
    "retire_checkpoints",
    "rng_state",
    "set_rng_state",
    "step_dir",
    "verify",
]


# -- RNG ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
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


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _reseed(seed: int, step: int, rank: int) -> None:
    """Fresh, reproducible per-rank streams for a resume on another world size."""
    h = hashlib.sha256(f"mnemo-rng/{seed}/{step}/{rank}".encode()).hexdigest()
    seed_all(int(h[:15], 16))


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


def _under_ray() -> bool:
    return os.environ.get("MNEMO_LAUNCHER") == "ray"


def _restarted() -> bool:
    """torchrun restarted this worker group after a failure (`--max-restarts`)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def retire_checkpoints(run_dir: Path) -> Path | None:
    """`--resume never` in a used run dir: move its checkpoints aside, never delete them.

    Otherwise keep-N pruning would rank the old run's later steps above the new run's and a
    restart would resume the old run. Under Ray the launcher calls this once per launch and
    passes `resume=auto` to the workers, so a restart after a crash resumes this launch.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir() or not any(root.iterdir()):
        return None
    dest = root.with_name(f"checkpoints.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(root, dest)
    print(f"[mnemo] --resume never: moved earlier checkpoints to {dest}", flush=True)
    return dest


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's checkpoint-manager state


def orphans_over_keep(committed: list[Path], known: list[str], keep: int) -> list[Path]:
    """The committed checkpoints Ray does not know to delete so that `keep` remain, oldest first.

    `known` = the names Ray holds (registration order, oldest first); Ray keeps the newest
    `keep` of them, so only `keep - min(keep, len(known))` others may stay.
    """
    orphans = [d for d in committed if d.name not in set(known)]
    room = keep - min(keep, len([d for d in committed if d.name in set(known)]))
    return orphans[: max(0, len(orphans) - room)]


def prune_unreported(run_dir: Path, keep: int) -> list[Path]:
    """After a Ray run: delete the committed checkpoints Ray never heard of beyond `keep`.

    A report waits in the worker's queue until the controller polls it, and a worker killed
    before that takes it along; checkpoints written without Ray in this run dir were never
    reported. CheckpointConfig(num_to_keep) never prunes those. The Checkpointer prunes them at
    each commit; this is the safety net once `fit()` has returned (nothing races Ray's own
    deletes then). It reads the controller's snapshot and removes only committed directories it
    does not list; without a snapshot it does nothing. Returns what it removed.
    """
    snap = Path(run_dir) / "checkpoints" / RAY_SNAPSHOT
    if not snap.is_file():
        return []
    listed = [r["checkpoint_dir_name"] for r in load_json(snap).get("checkpoint_results", [])]
    stale = orphans_over_keep(committed_checkpoints(run_dir), listed, keep)
    for d in stale:
        uncommit(d)
        shutil.rmtree(d)
    return stale


class Checkpointer:
    """Saves and restores the full training state of every rank (one per rank, same calls)."""

    def __init__(self, cfg: JobConfig, env: DistEnv, run_dir: Path) -> None:
        self.cfg = cfg
        self.env = env
        self.run_dir = Path(run_dir)
        found = committed_checkpoints(self.run_dir)
        self._latest: Path | None = found[-1] if found else None
        self.async_save = cfg.checkpoint.async_save and cfg.scaling.strategy != "deepspeed"
        if cfg.checkpoint.async_save and not self.async_save and env.rank == 0:
            print("[mnemo] checkpoint.async_save: DeepSpeed saves synchronously", flush=True)
        self._pending: tuple[Path, Future, dict[str, Any]] | None = None
        self._deleter: ThreadPoolExecutor | None = None  # deletes pruned checkpoints
        self._binned: set[Path] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._stager: Any = None
        self._pg: Any = None
        # Under Ray: the names Ray holds (oldest first) and every name it held this attempt;
        # a directory Ray may still delete is never deleted here (its delete would then fail).
        self._ray_known: list[str] = []
        self._ray_owned: set[str] = set()
        if self.async_save:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mnemo-ckpt")
            if env.world > 1 and dist.is_initialized():
                # The writer thread's collectives must not interleave with the loop's.
                self._pg = dist.new_group(backend="gloo")

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
        """Write the checkpoint of `step`; synchronous unless checkpoint.async_save."""
        self.commit_pending()
        d = step_dir(self.run_dir, step)
        rank, world = self.env.rank, self.env.world
        if rank == 0:
            if d.exists():  # an interrupted save of this step, or a stale future of a resume
                self._discard([d])
            self._clean_uncommitted(below=step)
            d.mkdir(parents=True)
        barrier(world)
        future = self._save_model(d, strategy)
        torch.save(rng_state(), d / f"rng_rank{rank}.pt")
        if rank == 0:
            meta = {
                "format": 1,
                "step": step,
                "train_state": train_state,
                "scheduler": _json_safe(strategy.scheduler.state_dict()),
                "loader": loader.state_dict(),
                "strategy": strategy.name,
                "zero_stage": self.cfg.scaling.zero_stage if strategy.name == "deepspeed" else None,
                "world_size": world,
                "model": self.cfg.model.name,
                "model_args": self.cfg.model.args,
                "seed": self.cfg.train.seed,
                "metrics": metrics or {},
                "versions": {"torch": torch.__version__},
            }
            # fsynced with the shards by write_rank_manifest, off the step loop's path
            write_atomic(d / TRAINER_STATE, json.dumps(meta, indent=2), durable=False)
        faults.maybe_fail(step, rank, self.run_dir, point="save")
        report = {**{k: v for k, v in (metrics or {}).items() if _scalar(v)}, "step": step}
        if future is None:
            write_rank_manifest(d, rank, world)
            self._commit(d, report)
        else:
            assert self._executor is not None
            done = self._executor.submit(self._finish_async, future, d)
            self._pending = (d, done, report)
        return d

    def _finish_async(self, future: Future, d: Path) -> None:
        future.result()
        write_rank_manifest(d, self.env.rank, self.env.world)

    def _save_model(self, d: Path, strategy: Strategy) -> Future | None:
        if strategy.name == "deepspeed":
            strategy.engine.save_checkpoint(str(d / "ds"), tag="state", save_latest=False)
            return None
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(strategy.module, strategy.optimizer)
        sd = {"model": msd, "optim": osd}
        writer = dcp.FileSystemWriter(str(d / "dcp"))
        alone = not dist.is_initialized()  # one process without a group: say so, no warning
        if not self.async_save:
            with quiet_single_process():
                dcp.save(sd, storage_writer=writer, no_dist=alone)
            return None
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            # Synchronous copy into CPU buffers cached across saves (no pinning on CPU).
            self._stager = DefaultStager(StagingOptions(False, False, False, False))
        return dcp.async_save(
            sd,
            storage_writer=writer,
            process_group=self._pg,
            async_stager=self._stager,
            no_dist=alone,
        )

    def _commit(self, d: Path, report: dict[str, Any]) -> None:
        """Once every rank wrote its part: MANIFEST, then COMMITTED, then prune and report."""
        barrier(self.env.world)
        if self.env.rank == 0:
            merge_manifests(d, self.env.world)
            write_atomic(d / COMMITTED, f"{step_of(d)}\n")
            fsync_dir(d)
            if _under_ray():  # CheckpointConfig(num_to_keep) deletes the ones Ray knows
                self._prune_under_ray(reporting=d.name)
            else:
                self._prune()
        barrier(self.env.world)
        self._latest = d
        if _under_ray():
            self._report(d, report)

    def commit_pending(self) -> None:
        """Wait for an in-flight async save on every rank, then commit and report it."""
        if self._pending is None:
            return
        d, done, report = self._pending
        self._pending = None
        try:
            done.result()
        except Exception as e:
            raise RuntimeError(
                f"async checkpoint save to {d} failed on rank {self.env.rank}"
            ) from e
        self._commit(d, report)

    def _report(self, d: Path, metrics: dict[str, Any]) -> None:
        """Register the checkpoint with Ray Train in place: NO_UPLOAD, no second copy."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        ckpt = Checkpoint.from_directory(str(d)) if self.env.rank == 0 else None
        ray.train.report(
            metrics,
            checkpoint=ckpt,
            checkpoint_dir_name=d.name,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )

    def _ours(self, d: Path) -> bool:
        """`d` is a checkpoint of this run dir (not another run's, resumed from)."""
        return d.resolve().parent == (self.run_dir / "checkpoints").resolve()

    def _sync_with_ray(self, d: Path | None, meta: dict[str, Any] | None) -> None:
        """At the start of a Ray attempt: learn what Ray holds, report the resumed checkpoint
        again if Ray lost its report in a crash, prune the checkpoints Ray will never prune.

        A report waits in the worker's queue until the controller polls it; a worker killed
        before that takes it along. Ray would then never prune that checkpoint
        (CheckpointConfig.num_to_keep); resuming does not depend on Ray knowing it. Another run's
        checkpoint (`--resume` of a path outside this run dir) is never reported: it is not
        Ray's to delete, and Ray refuses checkpoints outside its experiment dir.
        """
        import ray.train
        from ray.train import CheckpointConsistencyMode

        again = [False]
        if self.env.rank == 0:
            held = ray.train.get_all_reported_checkpoints(
                consistency_mode=CheckpointConsistencyMode.COMMITTED
            )
            root = (self.run_dir / "checkpoints").resolve()
            self._ray_known = [
                Path(r.checkpoint.path).name
                for r in held
                if Path(r.checkpoint.path).resolve().parent == root
            ]
            self._ray_owned = set(self._ray_known)
            again = [d is not None and self._ours(d) and d.name not in self._ray_owned]
            self._prune_under_ray(reporting=d.name if again[0] and d is not None else None)
        if self.env.world > 1 and dist.is_initialized():
            dist.broadcast_object_list(again, src=0)
        if again[0]:
            assert d is not None and meta is not None
            scalars = {k: v for k, v in meta.get("metrics", {}).items() if _scalar(v)}
            self._report(d, {**scalars, "step": meta["step"]})

    def _prune_under_ray(self, reporting: str | None) -> None:
        """Rank 0, under Ray: at most `keep` committed checkpoints once Ray registered
        `reporting` (the one about to be reported).

        Ray deletes the oldest of those it holds beyond num_to_keep: those are un-committed now
        (Ray deletes the directory at its next poll; a crash before leaves them unresumable, and
        Ray still deletes them later). The orphans, which Ray never deletes, go here.
        """
        keep = self.cfg.checkpoint.keep
        if reporting is not None and reporting not in self._ray_known:
            self._ray_known.append(reporting)
            self._ray_owned.add(reporting)
        doomed = self._ray_known[:-keep]
        self._ray_known = self._ray_known[-keep:]
        for name in doomed:
            d = self.run_dir / "checkpoints" / name
            if d.is_dir():
                uncommit(d)
        self._discard(orphans_over_keep(committed_checkpoints(self.run_dir), self._ray_known, keep))

    def _prune(self) -> None:
        done = committed_checkpoints(self.run_dir)
        self._discard(done[: max(0, len(done) - self.cfg.checkpoint.keep)])

    def _clean_uncommitted(self, below: int) -> None:
        """Leftovers of interrupted saves older than `below` are garbage (never resumable)."""
        pending = self._pending[0] if self._pending else None
        dirs = all_checkpoints(self.run_dir)
        self._discard(
            [
                d
                for d in dirs
                if step_of(d) < below
                and d != pending
                and not is_done(d)
                and d.name not in self._ray_owned  # Ray deletes it (it would fail if gone)
            ]
        )
        root = self.run_dir / "checkpoints"
        for trash in root.glob(".trash-*") if root.is_dir() else []:  # a crash's leftovers
            if trash not in self._binned:
                self._binned.add(trash)
                self._bin().submit(shutil.rmtree, trash, ignore_errors=True)

    def _discard(self, dirs: list[Path]) -> None:
        """Un-commit and rename away now (atomic, cheap); delete the files in the background:
        freeing GBs of freshly written pages takes seconds, with every rank at a barrier."""
        for d in dirs:
            uncommit(d)
            trash = d.with_name(f".trash-{d.name}-{os.urandom(4).hex()}")
            os.replace(d, trash)
            self._binned.add(trash)
            self._bin().submit(shutil.rmtree, trash, ignore_errors=True)

    def _bin(self) -> ThreadPoolExecutor:
        if self._deleter is None:
            self._deleter = ThreadPoolExecutor(1, thread_name_prefix="mnemo-ckpt-prune")
        return self._deleter

    def finalize(self) -> None:
        """Commit an in-flight async save and release the writer and pruning threads."""
        self.commit_pending()
        if self._deleter is not None:
            self._deleter.shutdown(wait=True)
            self._deleter = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        barrier(self.env.world)

    # -- restore ------------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        """The checkpoint `--resume` names, decided by rank 0 so every rank loads the same."""
        choice: list[str | None] = [None]
        if self.env.rank == 0:
            p = self._choose()
            choice = [str(p) if p else None]
        if self.env.world > 1 and dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def _choose(self) -> Path | None:
        r = self.cfg.resume
        if r == "auto" or (r == "never" and _restarted()):
            return self._latest
        if r == "never":
            retire_checkpoints(self.run_dir)
            self._latest = None
            return None
        # A restart after a crash continues this run dir's newer checkpoints, not PATH again
        # (PATH may even have been pruned since, so a step_* name is compared before PATH is
        # diagnosed). To go back in time inside a run dir, copy PATH into a new --run-dir.
        named = step_of(Path(r)) if re.fullmatch(r"step_\d+", Path(r).name) else None
        p = None if named is not None and self._newer(named) else Path(resume_target(r))
        if p is None or self._newer(named_step(p)):
            print(f"[mnemo] --resume {r}: {self._latest} is newer; resuming from it", flush=True)
            return self._latest
        return p

    def _newer(self, step: int) -> bool:
        """This run dir holds a committed checkpoint past `step`."""
        return self._latest is not None and step_of(self._latest) > step

    def restore(self, strategy: Strategy, loader: BatchLoader) -> dict[str, Any] | None:
        """Load the checkpoint `--resume` names into strategy and loader; None if there is none."""
        d = self.resume_path()
        if d is None:
            if _under_ray():
                self._sync_with_ray(None, None)
            return None
        verify(d, self.env.rank, self.env.world)
        meta = load_json(d / TRAINER_STATE)
        for key, want in (("strategy", strategy.name), ("model", self.cfg.model.name)):
            if meta.get(key) != want:
                raise CheckpointError(
                    f"checkpoint {d} was written with {key} {meta.get(key)!r}; "
                    f"this run uses {want!r}"
                )
        if strategy.name == "deepspeed":
            self._load_deepspeed(d, strategy, meta)
        else:
            self._load_dcp(d, strategy)
        strategy.scheduler.load_state_dict(meta["scheduler"])
        loader.load_state_dict(meta["loader"])
        if meta["world_size"] == self.env.world:
            set_rng_state(load_pt(d / f"rng_rank{self.env.rank}.pt"))
        else:  # the old per-rank streams belong to another partition of the work
            _reseed(self.cfg.train.seed, meta["step"], self.env.rank)
        if _under_ray():
            self._sync_with_ray(d, meta)
        if self.env.rank == 0:
            how = (
                "" if meta["world_size"] == self.env.world else f" (saved on {meta['world_size']})"
            )
            print(f"[mnemo] resumed from {d} (step {meta['step']}){how}", flush=True)
        return meta["train_state"]

    def _load_dcp(self, d: Path, strategy: Strategy) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(strategy.module, strategy.optimizer)
        sd = {"model": msd, "optim": osd}
        dcp_load(sd, d / "dcp", no_dist=not dist.is_initialized())
        set_state_dict(
            strategy.module,
            strategy.optimizer,
            model_state_dict=sd["model"],
            optim_state_dict=sd["optim"],
        )

    def _load_deepspeed(self, d: Path, strategy: Strategy, meta: dict[str, Any]) -> None:
        """Same world size and stage: the engine checkpoint; otherwise its universal form."""
        engine = strategy.engine
        if meta.get("zero_stage") != self.cfg.scaling.zero_stage:
            raise CheckpointError(
                f"checkpoint {d} was written with ZeRO-{meta.get('zero_stage')}; this run uses "
                f"ZeRO-{self.cfg.scaling.zero_stage} (DeepSpeed 0.19.8's universal checkpoint "
                "fails to load across stages; set scaling.zero_stage to match)"
            )
        universal = meta["world_size"] != self.env.world
        load_dir = d / "ds"
        if universal:
            if self.env.rank == 0:
                to_universal(d)
            barrier(self.env.world)
            load_dir = d / UNIVERSAL
        # DeepSpeed 0.19.8's ZeRO-3 universal load (a) copies param group 0's hyperparameters
        # onto every group (weight decay onto norms and biases) and (b) gives every group one
        # shared `step` tensor, which AdamW then advances once per group per step (wrong bias
        # correction). Undone below: each group keeps its own hyperparameters and step.
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        own = [{k: v for k, v in g.items() if k not in _RESTORED} for g in base.param_groups]
        before = engine._config.load_universal_checkpoint
        engine._config.load_universal_checkpoint = universal
        try:
            with deepspeed_safe_load():
                path, _ = engine.load_checkpoint(str(load_dir), tag="state")
        finally:
            engine._config.load_universal_checkpoint = before
        if path is None:
            raise CheckpointError(f"DeepSpeed checkpoint under {load_dir} could not be loaded")
        if universal:
            for group, hyper in zip(base.param_groups, own, strict=True):
                group.update(hyper)
            for st in base.state.values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].clone()


# Param-group keys a checkpoint restores; the others (weight decay, betas, ...) come from config.
_RESTORED = ("params", "lr", "initial_lr", "step")


def _scalar(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
