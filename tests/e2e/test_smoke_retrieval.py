"""The smoke recipe's claim, checked: its in-training passkey eval lands in metrics.jsonl and
summary.json, and the trained model retrieves held-out keys far above chance.

The exact `titans_2m --preset smoke` config, on its 2 DDP ranks under torchrun (the same loop
Ray Train runs, without Ray's start-up), seed fixed.
"""

from __future__ import annotations

import json
import math

import pytest

import launch.titans_2m  # noqa: F401  (registers the recipe's presets)
from system import config as C
from tests._runs import check, read_metrics, run_torchrun


def binom_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how likely guessing scores at least k of n."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_binom_tail_on_known_values():
    assert binom_tail(4, 0, 0.3) == pytest.approx(1.0)
    assert binom_tail(3, 3, 0.5) == pytest.approx(0.125)
    assert binom_tail(10, 5, 0.1) == pytest.approx(0.0016349374, rel=1e-6)


@pytest.mark.slow
def test_smoke_run_reports_and_retrieves_passkeys(tmp_path):
    run = tmp_path / "run"
    cfg = C.load("titans_2m", "smoke", [f"run_dir={run}", "resume=never"])
    assert cfg.eval.every > 0 and cfg.data.source == "passkey"
    proc = run_torchrun(cfg, nproc=cfg.scaling.workers, timeout=400)
    check(proc)

    # Every eval step's held-out accuracy is a metrics.jsonl line, and the console shows it.
    steps = cfg.train.steps
    want = sorted({*range(cfg.eval.every, steps + 1, cfg.eval.every), steps})
    evals = [m for m in read_metrics(run) if "eval_passkey_acc" in m]
    assert [m["step"] for m in evals] == want
    for m in evals:
        assert 0.0 <= m["eval_passkey_acc"] <= m["eval_digit_acc"] <= 1.0
    eval_lines = [x for x in proc.stdout.splitlines() if x.startswith("eval ")]
    assert len(eval_lines) == len(want) and "held-out keys" in eval_lines[-1]

    # summary.json carries the last eval and the chance it is to be read against.
    summary = json.loads((run / "summary.json").read_text())
    last = evals[-1]
    assert summary["final_passkey_acc"] == last["eval_passkey_acc"]
    assert summary["final_digit_acc"] == last["eval_digit_acc"]
    a, k = cfg.data.passkey_alphabet, cfg.data.passkey_digits
    assert summary["passkey_chance"] == pytest.approx(a**-k)
    assert summary["digit_chance"] == pytest.approx(1 / a)
    n = summary["eval_probes"]
    assert n == cfg.eval.batches * cfg.train.micro_batch * cfg.scaling.workers

    # Retrieval, not guessing: guessing would score this many keys / digits with p < 1e-6.
    keys = round(summary["final_passkey_acc"] * n)
    digits = round(summary["final_digit_acc"] * n * k)
    assert binom_tail(n, keys, a**-k) < 1e-6, (keys, n, eval_lines)
    assert binom_tail(n * k, digits, 1 / a) < 1e-6, (digits, n * k, eval_lines)
    # The loss falling first on the filler is what the issue was: the eval must have moved.
    assert evals[-1]["eval_digit_acc"] > evals[0]["eval_digit_acc"], eval_lines
