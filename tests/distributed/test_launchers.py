"""The recipe under each real launcher: embedded Ray Train, accelerate launch, torchrun.

Each writes the run directory of DESIGN.md; the loss falls; world_size is 2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests._runs import ROOT, check, env_for_subprocess, free_port, read_metrics, tiny_config

pytestmark = pytest.mark.slow

FIELDS = {
    "step",
    "loss",
    "lr",
    "tokens",
    "tokens_per_s",
    "mfu",
    "mem_gb",
    "world_size",
    "skipped_samples",
}


def _check_run_dir(run, steps: int, world: int) -> list[dict]:
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == steps
    ms = read_metrics(run)
    assert [m["step"] for m in ms] == list(range(1, steps + 1))
    for m in ms:
        assert FIELDS <= set(m), f"metrics.jsonl line lacks {FIELDS - set(m)}"
        assert m["world_size"] == world
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == steps and summary["final_loss"] == ms[-1]["loss"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ms[-1]["loss"] < ms[0]["loss"]
    return ms


def test_recipe_on_embedded_ray(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "launch/transformer_lm.py",
        "--preset",
        "smoke",
        "--address",
        "local",
        "--run-dir",
        str(run),
        "--resume",
        "never",
        "--set",
        "train.steps=8",
        "--set",
        "log.every=1",
        "--set",
        "eval.every=4",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env_for_subprocess(), capture_output=True, text=True, timeout=400
    )
    check(proc)
    ms = _check_run_dir(run, 8, world=2)
    assert "eval_loss" in ms[3] and "eval_loss" in ms[7]
    assert "(ray, cpu)" in proc.stdout + proc.stderr
    # Ray Train registers our checkpoints in place: its experiment dir is RUN_DIR/checkpoints.
    assert (run / "checkpoints" / "checkpoint_manager_snapshot.json").exists()


def test_accelerate_launch_two_processes(tmp_path):
    accel = shutil.which("accelerate", path=str(ROOT / ".venv" / "bin")) or shutil.which(
        "accelerate"
    )
    assert accel, "accelerate is a dependency and must be installed"
    cfg = tiny_config(tmp_path)
    (tmp_path / "job.json").write_text(json.dumps(cfg.to_dict()))
    cmd = [
        accel,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "system.trainer",
        str(tmp_path / "job.json"),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env_for_subprocess(), capture_output=True, text=True, timeout=300
    )
    check(proc)
    _check_run_dir(tmp_path, cfg.train.steps, world=2)
