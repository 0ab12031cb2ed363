"""Real Ray Train (embedded local cluster via the launcher, `--address local`), 2 workers, ddp:
a worker SIGKILLs itself, `FailureConfig(max_failures=1)` restarts the worker group, and the
loop resumes by itself from the newest COMMITTED checkpoint of the run dir.

1. killed (rank 1) at the start of step 7, checkpoints every 3: resumes at step 6;
2. killed (rank 0) inside the save of step 6, after its shards were written but before the
   commit: that checkpoint is not used, the run resumes at step 3 (here with `--resume never`:
   a restart still resumes this launch's own checkpoints).
Both end bit-identical to the uninterrupted torchrun run of test_checkpoint_resume, and Ray's
CheckpointConfig(num_to_keep=2) has pruned the run down to steps 9 and 12 (it knows them
because the Checkpointer reports every commit with CheckpointUploadMode.NO_UPLOAD).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from system import checkpoint as C
from system.ckpt_tools import consolidated_state_dict
from tests._runs import ROOT, check, env_for_subprocess, read_metrics
from tests.distributed.test_checkpoint_resume import EVERY, STEPS, baseline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "ckpt-runs"


def ray_run(run: Path, resume: str, fault: dict[str, str]) -> subprocess.CompletedProcess:
    """The recipe as a user starts it, with the test sizes of tests._runs.tiny_config."""
    sets = {
        "train.steps": STEPS,
        "train.seq_len": 128,
        "train.batch_tokens": 1024,
        "train.micro_batch": 2,
        "log.every": 1,
        "optim.warmup_steps": 2,
        "checkpoint.every": EVERY,
        "checkpoint.keep": 2,
        "scaling.max_failures": 1,
    }
    cmd = [sys.executable, "launch/transformer_lm.py", "--preset", "smoke", "--address", "local"]
    cmd += ["--run-dir", str(run), "--resume", resume, "--strategy", "ddp", "--workers", "2"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**env_for_subprocess(), **fault}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def _assert_matches_uninterrupted(run: Path, ref: Path) -> None:
    want, _ = consolidated_state_dict(ref / "checkpoints" / "step_00000012")
    got, meta = consolidated_state_dict(run)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs from the uninterrupted run"
    assert meta["train_state"] == {"step": 12, "tokens": 12 * 1024}
    assert [m["loss"] for m in read_metrics(run)] == [m["loss"] for m in read_metrics(ref)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 12 and summary["checkpoint"] == str(C.step_dir(run, 12))


def _assert_ray_pruned_to_two(run: Path) -> None:
    names = ["step_00000009", "step_00000012"]
    assert [d.name for d in C.all_checkpoints(run)] == names
    snap = json.loads((run / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == names


def test_killed_worker_restarts_and_resumes(base):
    ref = baseline(base, "ddp")
    run = base / "ray-killed-at-step"
    fault = {"MNEMO_FAULT_AT_STEP": "7", "MNEMO_FAULT_RANK": "1"}
    proc = ray_run(run, "auto", fault)
    check(proc)
    out = proc.stdout + proc.stderr
    assert (run / ".fault_fired_step_7").exists()
    assert f"resumed from {C.step_dir(run, 6)} (step 6)" in out
    assert "(ray, cpu)" in out
    _assert_matches_uninterrupted(run, ref)
    _assert_ray_pruned_to_two(run)


def test_killed_in_the_middle_of_a_save_resumes_from_the_one_before(base):
    ref = baseline(base, "ddp")
    run = base / "ray-killed-in-save"
    fault = {"MNEMO_FAULT_AT_STEP": "6", "MNEMO_FAULT_POINT": "save"}
    proc = ray_run(run, "never", fault)
    check(proc)
    out = proc.stdout + proc.stderr
    assert (run / ".fault_fired_save_6").exists()
    assert f"resumed from {C.step_dir(run, 3)} (step 3)" in out
    assert "resumed from" not in out.split("(step 3)")[1], "resumed more than once"
    _assert_matches_uninterrupted(run, ref)
    _assert_ray_pruned_to_two(run)
