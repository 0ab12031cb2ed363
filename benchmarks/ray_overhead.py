"""Ray Train overhead: the same loop on 2 CPU processes under Ray Train and under torchrun.

Prints the steady-state step time of each (median of the logged intervals after warm-up) and
their ratio. Goal: Ray / torchrun <= 1.05. Run on a quiet machine:
    .venv/bin/python benchmarks/ray_overhead.py [--steps 80]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests._runs import env_for_subprocess, free_port, tiny_config  # noqa: E402


def _steady(run: Path, skip: int) -> float:
    ms = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_time_s"] for m in ms if m["step"] > skip]
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    over = {
        "train.steps": args.steps,
        "log.every": args.every,
        "train.seq_len": 256,
        "train.batch_tokens": 4096,
        "train.micro_batch": 8,
        "scaling.workers": 2,
        "model.args": {"dim": 256, "n_layers": 4, "n_heads": 4},
    }
    tmp = Path(tempfile.mkdtemp(prefix="ray_overhead_"))
    env = env_for_subprocess()
    results = {}
    # torchrun
    cfg = tiny_config(tmp / "torchrun", **over)
    (tmp / "torchrun").mkdir(parents=True)
    (tmp / "torchrun" / "job.json").write_text(json.dumps(cfg.to_dict()))
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "system.trainer",
            str(tmp / "torchrun" / "job.json"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    results["torchrun"] = (_steady(tmp / "torchrun", args.every), time.perf_counter() - t0)
    # Ray Train (embedded local cluster), same config through the recipe CLI
    sets = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in over.items()]
    sets += ["train.seq_len=256", "optim.warmup_steps=2"]
    cmd = [
        sys.executable,
        "launch/transformer_lm.py",
        "--preset",
        "smoke",
        "--address",
        "local",
        "--run-dir",
        str(tmp / "ray"),
        "--resume",
        "never",
    ]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    results["ray"] = (_steady(tmp / "ray", args.every), time.perf_counter() - t0)

    tr, ry = results["torchrun"][0], results["ray"][0]
    print(f"{'launcher':<10} {'step time (ms)':>15} {'wall incl. start-up (s)':>24}")
    for k, (st, wall) in results.items():
        print(f"{k:<10} {1e3 * st:>15.1f} {wall:>24.1f}")
    print(f"ratio ray/torchrun (steady-state step time): {ry / tr:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
