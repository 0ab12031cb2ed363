"""Deterministic fault injection for tests (DESIGN.md, "Fault injection").

`MNEMO_FAULT_AT_STEP=N` makes rank `MNEMO_FAULT_RANK` (default 0) SIGKILL its own process when
it reaches step N, once per run directory: a marker file written just before the kill records
that it fired, so the restarted run goes past step N.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def maybe_fail(step: int, rank: int, run_dir: Path, point: str = "step") -> None:
    """Kill this process with SIGKILL if the environment asks for a fault here."""
    at = os.environ.get("MNEMO_FAULT_AT_STEP")
    if not at:
        return
    if os.environ.get("MNEMO_FAULT_POINT", "step") != point:
        return
    if step != int(at) or rank != int(os.environ.get("MNEMO_FAULT_RANK", "0")):
        return
    marker = Path(run_dir) / f".fault_fired_{point}_{at}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed itself at {point} {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)
