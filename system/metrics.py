"""Run-directory outputs: metrics.jsonl lines (mirrored to TensorBoard / W&B when on), the
console line, summary.json and loss.png."""

from __future__ import annotations

import atexit
import json
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch

from system.config import LogConfig

# Dense bf16 peak per GPU for MFU (FLOP/s); unknown devices report no MFU.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in _PEAK_FLOPS.items():
        if key in name:
            return val
    return None


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def console_line(m: dict[str, Any], total_steps: int) -> str:
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "-"
    line = (
        f"step {m['step']:>6}/{total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
        f"{m['tokens_per_s'] / 1e3:8.1f}k tok/s | mfu {mfu} | mem {m['mem_gb']:.2f} GB | "
        f"eta {fmt_eta(m['eta_s'])}"
    )
    if "eval_loss" in m:
        line += f" | eval {m['eval_loss']:.4f}"
    if m.get("skipped_samples"):
        line += f" | skipped {m['skipped_samples']}"
    return line


def scalars(m: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields for TensorBoard / W&B; lists, dicts, None and bools are not
    scalars there (skipped_examples stays in metrics.jsonl only), and `step` is the x axis."""
    return {
        k: float(v)
        for k, v in m.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class TensorBoardSink:
    """Event files in RUN_DIR/tensorboard/; a resumed run appends to the same logdir."""

    def __init__(self, logdir: Path, purge_step: int | None) -> None:
        # Lazy: torch.utils.tensorboard pulls in tensorboard (seconds), only when it is on.
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the earlier session's events at steps >= the first one
        # this session writes, so steps a resume redoes show once, with their new values.
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def write(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()  # like metrics.jsonl: a crash keeps what was logged

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in RUN_DIR/wandb/; its id is kept in RUN_DIR/wandb/run_id so a resume of the
    run directory continues the same W&B run (offline: a new offline-run-* folder, same id)."""

    def __init__(
        self, run_dir: Path, mode: str, project: str, config: dict[str, Any], fresh: bool
    ) -> None:
        # Lazy: wandb is heavy and optional (the `tracking` extra); imported only when on.
        import wandb

        root = run_dir / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "run_id"
        # A run starting at step 0 (new, or --resume never) is a new W&B run: continuing the
        # old id would drop its steps below the old run's last one (W&B keeps the first value).
        run_id = id_file.read_text().strip() if id_file.exists() and not fresh else None
        if mode == "offline":
            # The process-wide settings too: with offline set on the run alone, wandb 0.31 still
            # posts its own usage metrics to the W&B server at exit (tests/unit/
            # test_metrics_sinks.py listens for any connection).
            wandb.setup(settings=wandb.Settings(mode="offline"))
        # dir=run_dir: wandb puts its files in dir/wandb/, i.e. RUN_DIR/wandb/.
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            id=run_id,
            resume="allow" if run_id else None,
            dir=str(run_dir),
            config=config,
            mode=mode,
        )
        if run_id is None:
            id_file.write_text(self.run.id + "\n")  # a fresh start replaces the old id

    def write(self, step: int, values: dict[str, float]) -> None:
        # W&B ignores steps below its current one, so a resume's redone steps keep the values
        # first logged for them (metrics.jsonl and TensorBoard show the new ones).
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Appends one JSON object per logged step (rank 0 only); flushes so a crash keeps them.

    With `log` given, its sinks (TensorBoard, W&B) get the record's numeric fields at the same
    step. `start_step` is where a resumed run continues: lines past it are dropped (redone).
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        log: LogConfig | None = None,
        config: dict[str, Any] | None = None,
        start_step: int | None = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.sinks: list[TensorBoardSink | WandbSink] = []
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # A resumed run keeps the lines of steps it has not redone.
            self.history = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        if start_step is not None:
            self.truncate_after(start_step)
        if log is not None:
            self._open_sinks(run_dir, log, config or {}, start_step)

    def _open_sinks(
        self, run_dir: Path, log: LogConfig, config: dict[str, Any], start_step: int | None
    ) -> None:
        # Closed at exit too: a run that raises still finishes its W&B run and event file.
        atexit.register(self.close)
        if log.tensorboard:
            purge = None if start_step is None else start_step + 1
            self.sinks.append(TensorBoardSink(run_dir / "tensorboard", purge))
        if log.wandb != "off":
            fresh = not start_step
            self.sinks.append(WandbSink(run_dir, log.wandb, log.wandb_project, config, fresh))

    def truncate_after(self, step: int) -> None:
        """Drop lines past `step` (a resume redoes them) so the file stays one line per step."""
        if not self.enabled:
            return
        self.history = [m for m in self.history if m["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in self.history))
        os.replace(tmp, self.path)

    def write(self, m: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.history.append(m)
        with self.path.open("a") as f:
            f.write(json.dumps(m) + "\n")
            f.flush()
        if self.sinks:
            values = scalars(m)
            for sink in self.sinks:
                sink.write(m["step"], values)

    def close(self) -> None:
        """Finish the sinks (idempotent: the end of the run and the exit hook both call it)."""
        sinks, self.sinks = self.sinks, []
        atexit.unregister(self.close)
        for sink in sinks:
            sink.close()


def plot_loss(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """loss.png: training loss (and eval loss where logged) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [m["step"] for m in history]
    ax.plot(steps, [m["loss"] for m in history], label="train")
    ev = [(m["step"], m["eval_loss"]) for m in history if "eval_loss" in m]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
