"""One training step (forward + backward + AdamW) at growing context on this CPU.

    .venv/bin/python benchmarks/context_scaling.py --model titans-mac-tiny [--lengths 16k,...]

Each length runs in a fresh process so its peak RSS is its own. The long-context savers of the
full recipe are on (block-level activation checkpointing, memory checkpointed per segment,
chunked loss). Goal: memory linear in L,
and the 2,097,152-token step within 16 GB here. Prints time, tokens/s and peak RSS per length,
and the RSS per token relative to the shortest length (1.0 = linear).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_step(model_name: str, length: int, args: dict) -> dict:
    import torch

    import models
    from system.strategies.fsdp import apply_activation_checkpointing

    torch.manual_seed(0)
    model = models.build(model_name, **args).train()
    apply_activation_checkpointing(model)  # per block, as the full recipe's strategy does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (1, length + 1))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    out.loss.backward()
    opt.step()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "length": length,
        "seconds": dt,
        "peak_rss_gb": peak,
        "baseline_rss_gb": rss0,
        "loss": float(out.loss),
    }


def main() -> None:
    from system.evaluate import parse_lengths

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="titans-mac-tiny")
    ap.add_argument("--lengths", default="16k,64k,256k,1m,2m")
    ap.add_argument("--segment", type=int, default=512, help="MAC segment / checkpoint length")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    margs = {"mem_checkpoint": a.segment, "loss_chunk": 16384}
    if "mac" in a.model:
        margs["segment_len"] = a.segment
    if a.child:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        print(json.dumps(one_step(a.model, int(a.child), margs)))
        return
    rows = []
    for n in parse_lengths(a.lengths):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--model",
                a.model,
                "--segment",
                str(a.segment),
                "--threads",
                str(a.threads),
                "--child",
                str(n),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            print(f"L={n}: failed\n{proc.stderr[-2000:]}")
            break
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"L={n:>9,}  step {r['seconds']:8.1f} s  {n / r['seconds']:9.0f} tok/s  "
            f"peak RSS {r['peak_rss_gb']:6.2f} GB",
            flush=True,
        )
    if not rows:
        return
    base = rows[0]
    per0 = (base["peak_rss_gb"] - base["baseline_rss_gb"]) / base["length"]
    print(
        f"\n{'length':>10} {'s/step':>8} {'peak GB':>8} {'GB above start':>15} "
        f"{'per-token vs first':>19}"
    )
    for r in rows:
        extra = r["peak_rss_gb"] - r["baseline_rss_gb"]
        ratio = (extra / r["length"]) / per0 if per0 > 0 else float("nan")
        print(
            f"{r['length']:>10,} {r['seconds']:>8.1f} {r['peak_rss_gb']:>8.2f} "
            f"{extra:>15.2f} {ratio:>19.2f}"
        )
    last = rows[-1]
    if last["length"] >= 2_097_152:
        ok = "yes" if last["peak_rss_gb"] <= 16 else "NO"
        print(f"2,097,152-token step within 16 GB: {ok} ({last['peak_rss_gb']:.2f} GB)")


if __name__ == "__main__":
    main()
