"""Crash and resume under real torchrun (2 gloo processes): bit-identical to never stopping.

Per strategy: one uninterrupted 12-step run, and one killed (SIGKILL, MNEMO_FAULT_AT_STEP=7)
then resumed with `--resume auto` to step 12. Checkpoints every 3 steps. The resumed run must
end with exactly the same consolidated weights (torch.equal), the same loss at every step, the
same token count and loader position. ddp and deepspeed (ZeRO-2) save synchronously, so the
resume starts at step 6; fsdp saves asynchronously, whose step-6 save is still uncommitted when
step 7 dies (commit happens at the next save), so that resume starts at step 3.
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
from tests._runs import ROOT, check, env_for_subprocess, free_port, read_metrics, tiny_config

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 3
ASYNC = {"fsdp": True}  # which strategies run the crash test with checkpoint.async_save


def job(run: Path, strategy: str, workers: int = 2, **extra):
    base = {
        "scaling.strategy": strategy,
        "scaling.workers": workers,
        "train.steps": STEPS,
        "checkpoint.every": EVERY,
        "resume": "auto",
    }
    return tiny_config(run, **{**base, **extra})


def torchrun(cfg, nproc: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m system.trainer job.json` with extra environment."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg_file = run / "job.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += ["-m", "system.trainer", str(cfg_file)]
    full_env = {**env_for_subprocess(), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def baseline(base: Path, strategy: str) -> Path:
    """The uninterrupted 2-worker run, made once per session (shared with test_reshard)."""
    run = base / f"baseline-{strategy}"
    if not (run / "summary.json").exists():
        check(torchrun(job(run, strategy), 2))
    return run


def killed_at_step_7(run: Path, cfg) -> None:
    """Run `cfg` with rank 0 SIGKILLed at the start of step 7; record what was committed."""
    crash = torchrun(cfg, cfg.scaling.workers, {"MNEMO_FAULT_AT_STEP": "7"})
    assert crash.returncode != 0, "the fault did not fire"
    assert (run / ".fault_fired_step_7").exists()
    committed = [d.name for d in C.committed_checkpoints(run)]
    (run / "crash.json").write_text(json.dumps({"committed": committed}))


def crashed_and_resumed(base: Path, strategy: str) -> tuple[Path, subprocess.CompletedProcess]:
    """Killed at the start of step 7, then resumed; made once per session."""
    run = base / f"resumed-{strategy}"
    log = run / "resume.log"
    if not log.exists():
        cfg = job(run, strategy, **{"checkpoint.async_save": ASYNC.get(strategy, False)})
        killed_at_step_7(run, cfg)
        resumed = torchrun(cfg, 2, {"MNEMO_FAULT_AT_STEP": "7"})  # fired once: not again
        check(resumed)
        log.write_text(json.dumps({"stdout": resumed.stdout, "stderr": resumed.stderr}))
    out = json.loads(log.read_text())
    return run, subprocess.CompletedProcess([], 0, out["stdout"], out["stderr"])


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "ckpt-runs"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_crash_and_resume_is_bit_identical(base, strategy):
    ref = baseline(base, strategy)
    run, proc = crashed_and_resumed(base, strategy)
    resumed_from = 3 if ASYNC.get(strategy) else 6

    at_crash = json.loads((run / "crash.json").read_text())["committed"]
    assert at_crash[-1] == f"step_{resumed_from:08d}", at_crash
    assert f"resumed from {C.step_dir(run, resumed_from)} (step {resumed_from})" in proc.stdout

    want, _ = consolidated_state_dict(ref / "checkpoints" / "step_00000012")
    got, meta = consolidated_state_dict(run / "checkpoints" / "step_00000012")
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{strategy}: {k} differs after crash + resume"

    ref_meta = json.loads((ref / "checkpoints" / "step_00000012" / C.TRAINER_STATE).read_text())
    assert meta["train_state"] == ref_meta["train_state"] == {"step": 12, "tokens": 12 * 1024}
    assert meta["loader"] == ref_meta["loader"]
    assert meta["scheduler"]["last_epoch"] == 12
    losses = [(m["step"], m["loss"]) for m in read_metrics(run)]
    assert losses == [(m["step"], m["loss"]) for m in read_metrics(ref)]

    # checkpoint.keep=3 of every 3 steps; nothing uncommitted is left behind.
    names = ["step_00000006", "step_00000009", "step_00000012"]
    assert [d.name for d in C.committed_checkpoints(run)] == names
    assert [d.name for d in C.all_checkpoints(run)] == names


def test_async_save_leaves_no_gap_in_the_files(base):
    """Every async checkpoint, once committed, verifies and holds both ranks' shards."""
    run, _ = crashed_and_resumed(base, "fsdp")
    for d in C.committed_checkpoints(run):
        C.verify(d)
        shards = sorted(p.name for p in (d / "dcp").glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"], (d, shards)
        assert json.loads((d / C.TRAINER_STATE).read_text())["world_size"] == 2
