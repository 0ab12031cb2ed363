"""TensorBoard and W&B sinks beside metrics.jsonl, read back with the libraries' own readers.

TensorBoard: `EventAccumulator` over RUN_DIR/tensorboard/. W&B: offline runs in RUN_DIR/wandb/,
whose transaction log (`run-<id>.wandb`) is read by `wandb leet inspect --json`, wandb's reader.
Every W&B test runs with the proxy and the W&B server pointed at a local listener that counts
connections: an offline run must make none.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from system import config as C
from system.metrics import MetricsWriter, scalars
from tests._runs import check, env_for_subprocess, read_metrics, run_torchrun, tiny_config

WANDB = Path(sys.executable).with_name("wandb")
CONFIG = {"recipe": "test", "optim": {"lr": 0.003}, "train": {"steps": 4}}


class Listener:
    """A TCP listener on 127.0.0.1 that accepts and counts connections (any would be W&B's)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(2)
            try:
                self.requests.append(conn.recv(2048))
            except OSError:
                self.requests.append(b"")
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """W&B's server, any proxy, and its config/cache folders pointed away from the real ones."""
    listener = Listener()
    url = f"http://127.0.0.1:{listener.port}"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "WANDB_BASE_URL"):
        monkeypatch.setenv(var, url)
    for var in ("NO_PROXY", "no_proxy", "WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    yield listener
    listener.close()
    assert listener.connections == 0, f"the offline W&B run connected out: {listener.requests}"


def records(step: int, loss: float) -> dict[str, Any]:
    """A metrics.jsonl record like the trainer's, with the kinds of fields it holds."""
    return {
        "step": step,
        "loss": loss,
        "lr": 1e-3 * step,
        "tokens": 1024 * step,
        "tokens_per_s": 5000.5 + step,
        "mfu": None,
        "mem_gb": 0.25,
        "world_size": 2,
        "skipped_samples": 0,
        "skipped_examples": [{"rank": 0, "index": 3}],
        "flag": True,
    }


def tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def wandb_runs(run_dir: Path) -> list[list[dict[str, Any]]]:
    """Each offline run's records, oldest first, as wandb's own reader prints them."""
    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        proc = subprocess.run(
            [str(WANDB), "leet", "inspect", "--json", str(d)],
            capture_output=True,
            text=True,
            timeout=120,
            # The reader itself reports usage to the W&B server unless it is told it is offline.
            env={**os.environ, "WANDB_MODE": "offline"},
        )
        assert proc.returncode == 0, proc.stderr
        out.append([json.loads(x) for x in proc.stdout.splitlines() if x.strip()])
    return out


def history(recs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    rows = [r["history"] for r in recs if r["type"] == "history"]
    return {int(h["step"]["num"]): h["item"] for h in rows}


def run_record(recs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r["run"] for r in recs if r["type"] == "run")


def test_scalars_are_the_numeric_fields_but_step():
    assert scalars(records(3, 1.5)) == {
        "loss": 1.5,
        "lr": 0.003,
        "tokens": 3072.0,
        "tokens_per_s": 5003.5,
        "mem_gb": 0.25,
        "world_size": 2.0,
        "skipped_samples": 0.0,
    }


def test_both_sinks_hold_each_logged_value(tmp_path: Path, no_network: Listener):
    run = tmp_path / "run-a"
    log = C.LogConfig(tensorboard=True, wandb="offline", wandb_project="proj-x")
    w = MetricsWriter(run, enabled=True, log=log, config=CONFIG, start_step=0)
    ms = [records(s, 2.0 / s) for s in (1, 2, 3)]
    for m in ms:
        w.write(m)
    w.close()
    w.close()  # idempotent: the end of the run and the exit hook both call it

    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] == ms
    tb = tb_scalars(run / "tensorboard")
    assert set(tb) == set(scalars(ms[0]))  # no skipped_examples, mfu=None, bools or step
    for key in tb:
        assert [s for s, _ in tb[key]] == [1, 2, 3]
        assert [v for _, v in tb[key]] == pytest.approx([m[key] for m in ms], rel=1e-6)

    (recs,) = wandb_runs(run)
    meta = run_record(recs)
    assert meta["project"] == "proj-x" and meta["display_name"] == "run-a"
    assert meta["run_id"] == (run / "wandb" / "run_id").read_text().strip()
    config = meta["config"]["update"]
    assert {k: config[k] for k in CONFIG} == CONFIG
    hist = history(recs)
    assert sorted(hist) == [1, 2, 3]
    for m in ms:
        row = hist[m["step"]]
        assert {k: row[k] for k in scalars(m)} == scalars(m)  # JSON doubles: exact
        assert "skipped_examples" not in row and "mfu" not in row
    assert any(r["type"] == "exit" for r in recs), "the W&B run was not finished"


def test_resume_appends_to_tensorboard_and_continues_the_wandb_run(
    tmp_path: Path, no_network: Listener
):
    run = tmp_path / "run-b"
    log = C.LogConfig(tensorboard=True, wandb="offline")
    first = MetricsWriter(run, enabled=True, log=log, config=CONFIG, start_step=0)
    for s in (1, 2, 3, 4):
        first.write(records(s, 10.0 + s))
    first.close()
    time.sleep(1.1)  # offline-run folders are named to the second
    # Resumed from the checkpoint at step 2: steps 3 and 4 are redone with new values.
    second = MetricsWriter(run, enabled=True, log=log, config=CONFIG, start_step=2)
    for s in (3, 4):
        second.write(records(s, 20.0 + s))
    second.close()

    want = {1: 11.0, 2: 12.0, 3: 23.0, 4: 24.0}
    assert {m["step"]: m["loss"] for m in read_metrics(run)} == want
    assert tb_scalars(run / "tensorboard")["loss"] == [(s, v) for s, v in want.items()]

    runs = wandb_runs(run)
    assert len(runs) == 2
    ids = {run_record(r)["run_id"] for r in runs}
    assert ids == {(run / "wandb" / "run_id").read_text().strip()}
    assert run_record(runs[1])["resume"] is True
    assert {s: h["loss"] for s, h in history(runs[0]).items()} == {1: 11, 2: 12, 3: 13, 4: 14}
    # The resumed session logs the redone steps; W&B's server keeps a step's first value.
    assert {s: h["loss"] for s, h in history(runs[1]).items()} == {3: 23, 4: 24}

    # Starting over in the same run dir (--resume never: step 0) is a new W&B run, not the old
    # one continued (whose steps 1..4 would swallow the new run's).
    time.sleep(1.1)
    third = MetricsWriter(run, enabled=True, log=log, config=CONFIG, start_step=0)
    third.write(records(1, 30.0))
    third.close()
    new_id = (run / "wandb" / "run_id").read_text().strip()
    assert new_id not in ids
    assert run_record(wandb_runs(run)[-1])["run_id"] == new_id


CHILD = """
import sys
from pathlib import Path
from system.config import LogConfig
from system.metrics import MetricsWriter
log = LogConfig(tensorboard=True, wandb="offline")
w = MetricsWriter(Path(sys.argv[1]), enabled=True, log=log, config={}, start_step=0)
w.write({"step": 1, "loss": 0.5})
"""


def test_an_offline_run_connects_nowhere_up_to_its_process_exit(
    tmp_path: Path, no_network: Listener
):
    """wandb flushes usage metrics at exit, after an in-process test would have looked; the
    writer is left for the exit hook to close, as when a run raises."""
    run = tmp_path / "child"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for_subprocess(),
    )
    check(proc)
    time.sleep(0.5)  # the listener thread counts what arrived before the exit
    assert no_network.connections == 0, no_network.requests
    (recs,) = wandb_runs(run)
    assert history(recs) == {1: {**history(recs)[1], "loss": 0.5}}
    assert any(r["type"] == "exit" for r in recs), "the exit hook did not finish the W&B run"
    assert tb_scalars(run / "tensorboard")["loss"] == [(1, 0.5)]


def test_other_ranks_and_sinks_off_write_nothing_beside_metrics(tmp_path: Path):
    on = C.LogConfig(tensorboard=True, wandb="offline")
    w = MetricsWriter(tmp_path / "rank1", enabled=False, log=on, config=CONFIG, start_step=0)
    w.write(records(1, 1.0))
    w.close()
    assert not (tmp_path / "rank1").exists()
    w = MetricsWriter(tmp_path / "off", enabled=True, log=C.LogConfig(), start_step=0)
    w.write(records(1, 1.0))
    w.close()
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("value", ["on", "true", "Offline", ""])
def test_wandb_mode_must_be_off_offline_or_online(tmp_path: Path, value: str):
    with pytest.raises(ValueError, match=rf"log\.wandb={value!r} is not allowed.*'offline'"):
        tiny_config(tmp_path, **{"log.wandb": value})


def test_tensorboard_must_be_a_bool(tmp_path: Path):
    with pytest.raises(ValueError, match=r"log\.tensorboard='maybe'"):
        tiny_config(tmp_path, **{"log.tensorboard": "maybe"})
    with pytest.raises(ValueError, match=r"log\.tensorboard=1 is not allowed"):
        C.LogConfig(tensorboard=1)
    assert tiny_config(tmp_path, **{"log.tensorboard": "true"}).log.tensorboard is True


@pytest.mark.parametrize(
    "key,value,module",
    [("log.tensorboard", "true", "tensorboard"), ("log.wandb", "online", "wandb")],
)
def test_a_sink_without_its_library_fails_at_load_with_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: str, module: str
):
    # None in sys.modules is Python's own "this module cannot be imported" marker.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=rf"{key}={value} needs the '{module}' package") as e:
        tiny_config(tmp_path, **{key: value})
    assert "pip install 'mnemosyne-train[tracking]'" in str(e.value)
    tiny_config(tmp_path, **{key: "false" if value == "true" else "off"})  # off: no library


@pytest.mark.slow
def test_torchrun_training_run_fills_both_sinks_with_metrics_loss(
    tmp_path: Path, no_network: Listener
):
    """Two ranks under torchrun: rank 0 alone writes; each logged step's loss is in all three."""
    run = tmp_path / "sinks-run"
    cfg = tiny_config(
        run, **{"train.steps": 4, "log.every": 2, "log.tensorboard": True, "log.wandb": "offline"}
    )
    check(run_torchrun(cfg, nproc=2))
    ms = read_metrics(run)
    assert [m["step"] for m in ms] == [2, 4]
    tb = tb_scalars(run / "tensorboard")
    assert [s for s, _ in tb["loss"]] == [2, 4]
    assert [v for _, v in tb["loss"]] == pytest.approx([m["loss"] for m in ms], rel=1e-6)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only
    (recs,) = wandb_runs(run)  # one run: rank 0 only
    assert {s: h["loss"] for s, h in history(recs).items()} == {m["step"]: m["loss"] for m in ms}
    meta = run_record(recs)
    assert meta["display_name"] == "sinks-run"
    assert meta["config"]["update"]["train"]["steps"] == 4
    assert any(r["type"] == "exit" for r in recs), "the W&B run was not finished"
