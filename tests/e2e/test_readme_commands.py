"""Every command on the README's first two screens runs, as a newcomer would type it.

The commands are read from the README itself (the ```bash blocks of its first SCREENS lines),
so the README cannot drift from what works. Each runs in a fresh folder holding only links to
`launch/`, `docs/` and `system/`, with the project's environment on PATH (what `source
.venv/bin/activate` gives) and without the test suite's Ray settings, in order. Training
commands get a few steps instead of the preset's (appended `--set` overrides, so the rest of
the command line is the README's); `--print-config` lines run unchanged. `make run` and
`make test` are what CI runs itself (.ci/run), so they are only checked to be there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCREENS = 2 * 45  # two screens of a terminal or a rendered page
SHORT = ["train.steps=4", "log.every=2", "checkpoint.every=2"]
TIMEOUT = 300
pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The shell commands of the bash blocks on the README's first screens (comments dropped)."""
    lines = (ROOT / "README.md").read_text().splitlines()[:SCREENS]
    cmds, inside, pending = [], False, ""
    for line in lines:
        if line.startswith("```"):
            inside = line.strip() in ("```bash", "```sh", "```console") and not inside
            continue
        if not inside:
            continue
        text = pending + re.sub(r"\s+#.*$", "", line).strip()
        if text.startswith("#") or not text:
            pending = ""
            continue
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        cmds.append(text)
    return cmds


def shortened(cmd: str) -> str:
    """A training command with a few steps; the README's own flags and order are kept."""
    words = cmd.split(">", 1)
    head = words[0].rstrip()
    trains = re.search(r"(^|\s)(python \S*launch/\S+\.py|mnemo train \S+)", head)
    if not trains or "--print-config" in head and len(words) == 1:
        return cmd
    extra = " ".join(f"--set {s}" for s in SHORT)
    return f"{head} {extra}" + (f" >{words[1]}" if len(words) > 1 else "")


def test_readme_shows_the_two_commands_first():
    first = (ROOT / "README.md").read_text().splitlines()[:40]
    assert any("make run" in x for x in first) and any("make test" in x for x in first)


def test_readme_commands_run(tmp_path):
    cmds = readme_commands()
    assert len(cmds) >= 6, f"expected the README's recipe commands, found {cmds}"
    make = [c for c in cmds if c.startswith("make ")]
    assert sorted(make) == ["make run", "make test"], make
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make run" in ci, ".ci/run must run both README commands"
    for name in ("launch", "docs", "system"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MNEMO_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    ran = []
    for cmd in cmds:
        if cmd.startswith("make ") or cmd.startswith("source "):
            continue  # make: CI runs both; source: PATH above is what activation gives
        line = shortened(cmd)
        proc = subprocess.run(
            line,
            shell=True,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            executable="/bin/bash",
        )
        assert proc.returncode == 0, (
            f"README command failed (exit {proc.returncode}): {cmd}\nran as: {line}\n"
            f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
        )
        ran.append(cmd)
    runs = sorted((tmp_path / "runs").glob("*/summary.json"))
    assert runs, "no README command left a run directory with summary.json under runs/"
    for s in runs:
        assert json.loads(s.read_text())["final_step"] == 4, s
    assert len(ran) >= 5, ran
