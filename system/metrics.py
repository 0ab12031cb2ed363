"""Run-directory outputs: metrics.jsonl lines, the console line, summary.json and loss.png."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch

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


class MetricsWriter:
    """Appends one JSON object per logged step (rank 0 only); flushes so a crash keeps them."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        if enabled and self.path.exists():
            # A resumed run keeps the lines of steps it has not redone.
            self.history = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

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
