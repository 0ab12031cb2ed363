"""Deterministic fault injection for tests (docs/ARCHITECTURE.md, "Fault injection").

`MNEMO_FAULT_AT_STEP=N` makes rank `MNEMO_FAULT_RANK` (default 0) SIGKILL its own process when
it reaches step N, once per run directory: a marker file written just before the kill records
that it fired, so the restarted run goes past step N. `MNEMO_FAULT_POINT` picks where:
`step` (default; before step N runs) or `save` (inside the save of step N, after the shards
were written or, with async saving, while they are being written; before the commit).
SIGKILL, not an exception: nothing gets to clean up, as with an OOM kill or a lost node.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

POINTS = ("step", "save")


def _env_int(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


def maybe_fail(step: int, rank: int, run_dir: Path, point: str = "step") -> None:
    """Kill this process with SIGKILL if the environment asks for a fault here."""
    if not os.environ.get("MNEMO_FAULT_AT_STEP"):
        return
    at = _env_int("MNEMO_FAULT_AT_STEP", "0")
    want = os.environ.get("MNEMO_FAULT_POINT", "step")
    if want not in POINTS:
        raise ValueError(f"MNEMO_FAULT_POINT={want!r}: expected one of {POINTS}")
    if want != point or step != at or rank != _env_int("MNEMO_FAULT_RANK", "0"):
        return
    marker = Path(run_dir) / f".fault_fired_{point}_{at}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed itself at {point} {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)
