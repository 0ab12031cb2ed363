"""Helpers to run the real launchers (torchrun, accelerate, Ray) on small configs in tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from system import config as C

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(run_dir: Path, **overrides) -> C.JobConfig:
    """A few-second job: transformer-tiny on passkey probes of 128 tokens."""
    cfg = C.smoke_base()
    base = {
        "run_dir": str(run_dir),
        "resume": "never",
        "train.steps": 6,
        "train.seq_len": 128,
        "train.batch_tokens": 1024,
        "train.micro_batch": 2,
        "log.every": 1,
        "optim.warmup_steps": 2,
    }
    base.update(overrides)
    return C.apply_overrides(cfg, {k: v for k, v in base.items()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for_subprocess() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_torchrun(cfg: C.JobConfig, nproc: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m system.trainer config.json` as a user would type it."""
    path = Path(cfg.run_dir)
    path.mkdir(parents=True, exist_ok=True)
    cfg_file = path / "job.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "system.trainer",
        str(cfg_file),
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=env_for_subprocess(), capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    )
