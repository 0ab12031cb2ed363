"""Resume on another world size: 2 workers -> 1 -> 2, for fsdp (DCP resharding) and deepspeed
ZeRO-3 (converted to a universal checkpoint on resume; ZeRO-3 because DeepSpeed 0.19.8's
universal load mangles its optimizer groups there, which system/checkpoint.py undoes).

A step-6 checkpoint of 2 workers (fsdp: test_checkpoint_resume's async run; ZeRO-3: a run
killed at step 7) resumes on 1 worker to step 12 (saving steps 9 and 12 from 1 worker); its
step-9 checkpoint then resumes on 2 workers. The
global batch and the global sample order do not depend on the world size (one rank
accumulates what two ranks computed), so the losses must follow the uninterrupted 2-worker
run up to floating-point reduction order. Tolerance: relative 2e-4 per step, as for
strategies vs one process (tests/distributed/test_strategies.py); measured here <= 1e-7.
RNG streams cannot carry over to another world size; every rank re-seeds from
(train.seed, step, rank) (system/checkpoint.py `_reseed`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from system import checkpoint as C
from tests._runs import check, read_metrics
from tests.distributed.test_checkpoint_resume import (
    baseline,
    crashed_and_resumed,
    job,
    killed_at_step_7,
    torchrun,
)

pytestmark = pytest.mark.slow

RTOL = 2e-4


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "ckpt-runs"


def _resume_from(src: Path, run: Path, strategy: str, workers: int, **extra) -> str:
    """Start a run dir holding only `src`, resume it on `workers` workers to step 12."""
    shutil.copytree(src, run / "checkpoints" / src.name)
    proc = torchrun(job(run, strategy, workers=workers, **extra), workers)
    check(proc)
    return proc.stdout


def _assert_follows(run: Path, ref: Path, first: int) -> None:
    want = {m["step"]: m["loss"] for m in read_metrics(ref)}
    got = {m["step"]: m for m in read_metrics(run) if m["step"] >= first}
    assert sorted(got) == list(range(first, 13))
    for step, m in got.items():
        err = abs(m["loss"] - want[step]) / abs(want[step])
        assert err <= RTOL, f"{run.name} step {step}: loss {m['loss']} vs {want[step]} ({err:.1e})"


def _source(base: Path, strategy: str, extra: dict) -> Path:
    if strategy == "fsdp":
        return crashed_and_resumed(base, strategy)[0]
    run = base / "zero3-killed"
    if not (run / "crash.json").exists():
        killed_at_step_7(run, job(run, strategy, **extra))
    return run


@pytest.mark.parametrize(
    "strategy,extra",
    [("fsdp", {}), ("deepspeed", {"scaling.zero_stage": 3})],
    ids=["fsdp", "zero3"],
)
def test_two_to_one_to_two_workers(base, strategy, extra):
    ref = baseline(base, strategy)  # ZeRO-2's: ZeRO-2 and -3 agree to ~1e-7 here
    six = C.step_dir(_source(base, strategy, extra), 6)
    assert C.load_json(six / C.TRAINER_STATE)["world_size"] == 2

    one = base / f"reshard-{strategy}-on1"
    out = _resume_from(six, one, strategy, workers=1, **extra)
    assert f"resumed from {C.step_dir(one, 6)} (step 6) (saved on 2)" in out
    _assert_follows(one, ref, first=7)
    nine = C.step_dir(one, 9)
    assert C.load_json(nine / C.TRAINER_STATE)["world_size"] == 1
    if strategy == "deepspeed":
        assert (C.step_dir(one, 6) / C.UNIVERSAL / "CONVERTED").exists()

    two = base / f"reshard-{strategy}-on2"
    out = _resume_from(nine, two, strategy, workers=2, **extra)
    assert f"resumed from {C.step_dir(two, 9)} (step 9) (saved on 1)" in out
    _assert_follows(two, ref, first=10)
    assert [m["world_size"] for m in read_metrics(two)][-1] == 2
