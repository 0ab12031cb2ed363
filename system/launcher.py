"""Ray orchestration: connect to (or start) a Ray cluster and run `train_loop` on N workers.

`--address auto` joins the cluster a `ray job submit` put us in (RAY_ADDRESS is set) or a
running local head, and otherwise starts an embedded one sized to this machine, which is shut
down at the end. The loop itself is plain PyTorch (system/trainer.py) so it also runs under
torchrun: `torchrun --nproc-per-node 2 -m system.trainer RUN_DIR/config.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from system.config import JobConfig

# Ray Train's controller polls workers every 2 s by default: each report() then costs ~2 s on
# a small run (docs/environment.md). 0.2 s keeps the overhead under a few percent. Train V2 also
# re-routes print() through a logger that tees it, doubling every console line: turned off.
_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def _ray_worker_entry(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker."""
    import ray.train

    from system.trainer import train_loop

    os.environ["MNEMO_LAUNCHER"] = "ray"
    summary = train_loop(config)
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, int | float)})


def connect(address: str, workers: int, cpus_per_worker: float) -> bool:
    """ray.init for `address`; returns True when we started an embedded cluster (ours to stop)."""
    import ray

    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return False
    env_vars = {k: os.environ[k] for k in _RAY_ENV}
    env_vars["PYTHONPATH"] = _pythonpath()
    # Fault injection (tests) must reach workers on any cluster, not only forked local ones.
    env_vars.update({k: v for k, v in os.environ.items() if k.startswith("MNEMO_FAULT_")})
    job_keys = _submitted_job_env_keys()
    runtime_env = {"env_vars": {k: v for k, v in env_vars.items() if k not in job_keys}}
    if address == "local" or (address == "auto" and not os.environ.get("RAY_ADDRESS")):
        if address == "auto":
            try:  # a head already running on this machine (ray start --head)
                ray.init(address="auto", runtime_env=runtime_env, log_to_driver=True)
                return False
            except ConnectionError:
                pass
        need = workers * cpus_per_worker
        print("[mnemo] starting an embedded Ray cluster on this machine", flush=True)
        try:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                include_dashboard=True,  # Train V2 watches its controller through the State API
                dashboard_host="127.0.0.1",
                dashboard_port=_free_port(),  # never collide with a head already on 8265
                runtime_env=runtime_env,
                log_to_driver=True,
            )
        except BaseException:  # Ctrl-C (or a failure) half-way: stop what was started
            ray.shutdown()
            raise
        return True
    target = "auto" if address == "auto" else address
    ray.init(address=target, runtime_env=runtime_env, log_to_driver=True)
    return False


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _submitted_job_env_keys() -> set[str]:
    """env_vars that `ray job submit --runtime-env` already set for this driver (a RayJob's).

    ray.init refuses a runtime_env repeating one of the job's env_vars keys ("Failed to merge
    the Job's runtime env"), so for those keys the job's value stands and ours is left out.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor
    if not raw:
        return set()
    return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})


def _pythonpath() -> str:
    """Workers import `system`, `models`, `data` from this checkout even without an install."""
    root = str(Path(__file__).resolve().parent.parent)
    cur = os.environ.get("PYTHONPATH", "")
    return root if not cur else f"{root}{os.pathsep}{cur}"


def build_trainer(cfg: JobConfig) -> Any:
    """The Ray Train TorchTrainer for this job (not yet fitted)."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    use_gpu = s.use_gpu == "true" or (s.use_gpu == "auto" and _cluster_has_gpus())
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    run_dir = Path(cfg.run_dir).resolve()
    del torch
    return TorchTrainer(
        train_loop_per_worker=_ray_worker_entry,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        # Experiment dir = RUN_DIR/checkpoints, so the Checkpointer's step dirs are reported
        # in place (CheckpointUploadMode.NO_UPLOAD, no second copy) and pruned by num_to_keep.
        run_config=RunConfig(
            name="checkpoints",
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


class RunFailed(RuntimeError):
    """Training failed in a worker (or Ray Train's controller); str() is the root error, once.

    Why: Ray Train V2 raises a WorkerGroupError whose message repeats every rank's traceback;
    the CLI prints this one line instead, after Ray's own logs.
    """


# Errors a rank raises because another rank went first (its peer vanished mid-collective).
_COLLATERAL = ("connection closed by peer", "connection reset by peer", "broken pipe")


def _innermost(exc: BaseException) -> BaseException:
    """Unwrap Ray's wrappers and the __cause__ chain down to the error that started it."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "_base_exc", None)  # ray.train UserExceptionWithTraceback
        if inner is None:
            inner = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        if not isinstance(inner, BaseException):
            inner = exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def _collateral(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    if isinstance(exc, RayActorError):  # a killed worker: often the root, but not when
        return True  # another rank raised an exception of its own
    text = str(exc).lower()
    return type(exc).__name__ == "DistBackendError" or any(m in text for m in _COLLATERAL)


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or "(no message)"
    if type(exc).__module__.startswith("ray."):  # Ray's own: several lines of actor details
        text = text.splitlines()[0]
    return text


def describe_failure(err: BaseException) -> str:
    """`Type: message (where)` of the root error behind a failed `fit()`.

    Of the failed ranks, the lowest one whose error is its own (not a peer that vanished or a
    worker process that died) is the root; the others are named after it.
    """
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(err, WorkerGroupError) and err.worker_failures:
        failures = {r: _innermost(e) for r, e in sorted(err.worker_failures.items())}
        rank = min(failures, key=lambda r: (_collateral(failures[r]), r))
        exc = failures[rank]
        others = [str(r) for r in failures if r != rank]
        also = f"; rank{'s' if len(others) > 1 else ''} {', '.join(others)} failed too"
        where = f"rank {rank}" + (also if others else "")
    elif isinstance(err, ControllerError):
        exc, where = _innermost(err.controller_failure), "Ray Train controller"
    else:
        exc, where = _innermost(err), "driver"
    return f"{type(exc).__name__}: {_message(exc)} ({where})"


def _fit(trainer: Any) -> Any:
    """trainer.fit(), its failure raised as RunFailed, a Ctrl-C during it as KeyboardInterrupt.

    Ray Train installs its own SIGINT handler inside fit(): it aborts the run, then calls
    sys.exit(0) or lets the controller's exit surface as an actor error, so a Ctrl-C would
    end with status 0 or 1. While fit() runs, signal.signal wraps that handler to note that
    it ran; Ray's handler still does the graceful abort.
    """
    import signal
    import threading

    from ray.train import TrainingFailedError

    interrupted: list[int] = []
    real_signal = signal.signal

    def noting(sig: int, handler: Any) -> Any:
        if sig == signal.SIGINT and callable(handler):
            ray_handler = handler

            def handler(signum: int, frame: Any) -> None:
                interrupted.append(signum)
                ray_handler(signum, frame)

        return real_signal(sig, handler)

    before = signal.getsignal(signal.SIGINT)
    signal.signal = noting
    try:
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            if not interrupted:
                raise RunFailed(describe_failure(e)) from None
        except (SystemExit, Exception):
            if not interrupted:
                raise
        else:
            if not interrupted:
                return result
        raise KeyboardInterrupt
    finally:
        signal.signal = real_signal
        if before is not None and threading.current_thread() is threading.main_thread():
            real_signal(signal.SIGINT, before)


def run(cfg: JobConfig) -> dict[str, Any]:
    """Run the job on Ray; returns the final reported metrics."""
    import ray

    started = connect(cfg.address, cfg.scaling.workers, cfg.scaling.cpus_per_worker)
    try:
        if cfg.scaling.use_gpu == "auto":
            cfg_gpu = "true" if _cluster_has_gpus() else "false"
            import dataclasses

            cfg = dataclasses.replace(
                cfg, scaling=dataclasses.replace(cfg.scaling, use_gpu=cfg_gpu)
            )
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        cfg.save(Path(cfg.run_dir) / "config.json")
        if cfg.resume == "never":  # a Ray restart after a crash must resume this launch's own
            import dataclasses

            from system.checkpoint import retire_checkpoints

            retire_checkpoints(Path(cfg.run_dir))
            cfg = dataclasses.replace(cfg, resume="auto")
        result = _fit(build_trainer(cfg))
        if result.error is not None:
            raise RunFailed(describe_failure(result.error))
        from system.checkpoint import prune_unreported

        keep = cfg.checkpoint.keep  # a report lost with a killed worker, or a torchrun save
        for d in prune_unreported(Path(cfg.run_dir), keep):
            print(f"[mnemo] removed {d}: checkpoint.keep={keep}, Ray never knew it", flush=True)
        return dict(result.metrics or {})
    finally:
        if started:
            ray.shutdown()
