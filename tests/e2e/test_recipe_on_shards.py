"""Issue 4, item 6: a recipe trains from token shards via `--set data.source=shards ...`.

`mnemo data text` writes the shards (through its CLI, as a user would), then the recipe runs
two torchrun workers on them with held-out eval; the loss falls and no sample is skipped.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from system.cli import main as mnemo
from tests._runs import ROOT, check, env_for_subprocess, read_metrics, run_torchrun, tiny_config
from tests._shards_testing import flip_payload, member_of

pytestmark = pytest.mark.slow


def test_recipe_reads_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    words = ["memory", "surprise", "momentum", "forget", "gate", "chunk", "token", "titan"]
    for k in range(40):
        (src / f"doc{k:03d}.txt").write_text(" ".join(rng.choice(words, 120)) + ".\n")
    out = tmp_path / "shards"
    assert (
        mnemo(
            [
                "data",
                "text",
                "--input",
                str(src),
                "--out",
                str(out),
                "--shard-size",
                "8KB",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "index.json").exists() and len(list(out.glob("shard-*.tar"))) > 2

    run = tmp_path / "run"
    cfg = tiny_config(
        run,
        **{
            "data.path": str(out),
            "data.source": "shards",
            "data.eval_fraction": 0.2,
            "eval.every": 3,
            "train.steps": 6,
            "scaling.workers": 2,
        },
    )
    check(run_torchrun(cfg, nproc=2))
    ms = read_metrics(run)
    assert ms[-1]["loss"] < ms[0]["loss"] - 0.5
    assert all(m["skipped_samples"] == 0 for m in ms) and "eval_loss" in ms[2]

    # A member corrupted in place (still valid tokens; only its checksum can tell), trained with
    # data.on_error=skip: metrics.jsonl counts it and names its shard and key.
    bad = set()
    for i in range(len(list(out.glob("shard-*.tar")))):  # the first member of every shard
        shard, key, _, data, _ = member_of(out, i, 0)
        flip_payload(shard, data, 3)
        bad.add((str(shard), key))
    bad_run = tmp_path / "bad_run"
    cfg = tiny_config(
        bad_run,
        **{
            "data.path": str(out),
            "data.source": "shards",
            "data.on_error": "skip",
            "train.steps": 4,
            "scaling.workers": 2,
        },
    )
    check(run_torchrun(cfg, nproc=2))
    ms = read_metrics(bad_run)
    assert ms[-1]["skipped_samples"] >= 1, ms[-1]
    named = [x for m in ms for x in m.get("skipped_examples", [])]
    assert len(named) == ms[-1]["skipped_samples"], named
    assert {(x["shard"], x["key"]) for x in named} <= bad, named
    assert all("checksum mismatch" in x["reason"] for x in named), named

    # The recipe's own CLI accepts the same overrides (validated as a whole, any order).
    proc = subprocess.run(
        [
            sys.executable,
            "launch/transformer_lm.py",
            "--set",
            "data.source=shards",
            "--set",
            f"data.path={out}",
            "--print-config",
        ],
        cwd=ROOT,
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    check(proc)
    assert '"source": "shards"' in proc.stdout
