"""`--resume PATH` of another run and `checkpoint.keep` under real Ray Train (embedded local
cluster, 2 ddp workers, the recipe started as a user starts it).

1. Fine-tuning / branching: run A trains 6 steps (checkpoints 2, 4, 6); run B starts in its
   own run dir from A's step 4, given as an absolute path and, from another working directory,
   as a relative one. B must continue exactly where A was (its steps 5-6 reproduce A's losses
   and A's step-6 weights bit for bit, so optimizer, RNG and loader position came along), write
   only to B, report only its own checkpoints to Ray, and leave A untouched.
2. keep: a run dir started under torchrun (steps 1-3, never reported to Ray) continues on Ray
   to step 8 with keep=3. Ray's num_to_keep counts only what it was told; the Checkpointer must
   count the rest, so at no time more than 3 committed checkpoints stay (a committed save may
   briefly make it 4 until its own commit prunes: the sampler below only flags a count that
   lasts 4 samples, 25 ms apart) and the run ends with steps 6, 7, 8.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from system import checkpoint as C
from system.ckpt_tools import consolidated_state_dict
from tests._runs import ROOT, check, env_for_subprocess, read_metrics, run_torchrun, tiny_config

pytestmark = pytest.mark.slow

SIZES = {
    "train.seq_len": 128,
    "train.batch_tokens": 1024,
    "train.micro_batch": 2,
    "log.every": 1,
    "optim.warmup_steps": 2,
}


def recipe(
    run_dir: str | Path, resume: str, cwd: Path = ROOT, **sets: object
) -> subprocess.CompletedProcess:
    """launch/transformer_lm.py on embedded Ray, 2 ddp workers, with the test sizes."""
    cmd = [sys.executable, str(ROOT / "launch" / "transformer_lm.py"), "--preset", "smoke"]
    cmd += ["--address", "local", "--run-dir", str(run_dir), "--resume", resume]
    cmd += ["--strategy", "ddp", "--workers", "2"]
    for k, v in {**SIZES, **sets}.items():
        cmd += ["--set", f"{k}={v}"]
    return subprocess.run(
        cmd, cwd=cwd, env=env_for_subprocess(), capture_output=True, text=True, timeout=400
    )


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: size and mtime (ns), to prove nothing was written there."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """Run A: 6 steps, checkpoints at 2, 4, 6."""
    base = tmp_path_factory.mktemp("branch")
    a = base / "A"
    check(recipe(a, "never", **{"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3}))
    assert [d.name for d in C.committed_checkpoints(a)] == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]
    return a


def _assert_continued_from_a(a: Path, b: Path, proc: subprocess.CompletedProcess) -> None:
    src = C.step_dir(a, 4)
    out = proc.stdout + proc.stderr
    assert f"resumed from {src} (step 4)" in out
    assert "start step 4" in out
    # B ran steps 5 and 6 only, with A's losses: weights, optimizer, RNG and loader came along.
    a_losses = {m["step"]: m["loss"] for m in read_metrics(a)}
    assert [(m["step"], m["loss"]) for m in read_metrics(b)] == [(5, a_losses[5]), (6, a_losses[6])]
    want, want_meta = consolidated_state_dict(C.step_dir(a, 6))
    got, got_meta = consolidated_state_dict(C.step_dir(b, 6))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k}: B's step 6 differs from A's"
    assert got_meta["train_state"] == want_meta["train_state"] == {"step": 6, "tokens": 6 * 1024}
    assert got_meta["loader"] == want_meta["loader"]
    assert got_meta["scheduler"]["last_epoch"] == 6
    # B writes its own checkpoints; Ray knows only those.
    assert [d.name for d in C.all_checkpoints(b)] == ["step_00000006"]
    snap = json.loads((b / "checkpoints" / C.RAY_SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == ["step_00000006"]
    summary = json.loads((b / "summary.json").read_text())
    assert summary["checkpoint"] == str(C.step_dir(b, 6))


def test_new_run_continues_from_another_runs_checkpoint(run_a, tmp_path):
    before = tree(run_a)
    b = tmp_path / "B"
    proc = recipe(b, str(C.step_dir(run_a, 4)), **{"train.steps": 6, "checkpoint.every": 2})
    check(proc)
    _assert_continued_from_a(run_a, b, proc)
    assert tree(run_a) == before, "run A was modified by run B"


def test_relative_resume_path_from_another_working_directory(run_a):
    """`--resume A/checkpoints/step_00000004` typed in A's parent directory (the workers run
    elsewhere: the path must reach them absolute)."""
    before = tree(run_a)
    base = run_a.parent
    proc = recipe(
        "C",
        "A/checkpoints/step_00000004",
        cwd=base,
        **{"train.steps": 6, "checkpoint.every": 2},
    )
    check(proc)
    _assert_continued_from_a(run_a, base / "C", proc)
    assert tree(run_a) == before, "run A was modified by run C"


class CommittedSampler:
    """Counts the committed checkpoints of a run dir every 25 ms while a run goes on."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.samples: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append([d.name for d in C.committed_checkpoints(self.run)])
            except OSError:  # a directory renamed or deleted between listing and stat
                pass
            time.sleep(0.025)

    def __enter__(self) -> CommittedSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def over(self, keep: int, lasting: int = 4) -> list[list[str]]:
        """Sets over keep seen in `lasting` samples in a row (>= 75 ms): not the instant
        between a save's COMMITTED and the pruning that follows it."""
        found, run = [], 0
        for names in self.samples:
            run = run + 1 if len(names) > keep else 0
            if run == lasting:
                found.append(names)
        return found


def test_keep_counts_the_checkpoints_ray_never_heard_of(tmp_path):
    run = tmp_path / "run"
    first = tiny_config(
        run,
        **{
            "scaling.workers": 2,
            "train.steps": 3,
            "checkpoint.every": 1,
            "checkpoint.keep": 3,
        },
    )
    check(run_torchrun(first, 2))  # steps 1-3: committed, never reported to Ray
    assert len(C.committed_checkpoints(run)) == 3
    with CommittedSampler(run) as sampler:
        proc = recipe(
            run, "auto", **{"train.steps": 8, "checkpoint.every": 1, "checkpoint.keep": 3}
        )
    check(proc)
    assert f"resumed from {C.step_dir(run, 3)} (step 3)" in proc.stdout + proc.stderr
    assert len(sampler.samples) > 20, "the sampler did not run alongside the run"
    assert sampler.over(3) == [], f"more than keep=3 committed: {sampler.over(3)[:3]}"
    names = ["step_00000006", "step_00000007", "step_00000008"]
    assert [d.name for d in C.committed_checkpoints(run)] == names
    assert [d.name for d in C.all_checkpoints(run)] == names  # nothing uncommitted left
    assert not list((run / "checkpoints").glob(".trash-*"))
    snap = json.loads((run / "checkpoints" / C.RAY_SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == names
