"""Launch settings of the depth-2 neural-memory Triton kernels, swept on a GPU.

Why: the chunks are walked in order, so a step's time is the latency of one chunk times their
number: one program per (batch, head) walking the hidden tiles ("walk"), or a program per
hidden tile with a few launches per chunk ("split"); the tile (BN), warps, pipelining stages
and dot precision set that latency, and what is best differs by GPU and Triton version.
Each setting is timed (fwd + bwd, CUDA events, median) beside the first one as a ratio, with
its output's rel-RMS difference from the first's (a fast setting that computes something
else shows here). Settings compile in parallel subprocesses first
(Triton's on-disk cache), so the sweep costs about one compile of wall time. Needs CUDA.

    python benchmarks/memory_triton_tiles.py                      # benchmark config, L 8k
    python benchmarks/memory_triton_tiles.py --lengths 2k,32k \
        --settings 32/8/1/tf32/walk,32/4/1/tf32/split
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS, HEAD_DIM, HIDDEN, CHUNK = 4, 64, 256, 64  # memory_vs_titans_pytorch.py's config
# BN/warps/stages/dot precision/kernel ("walk": a program per (batch, head) walks the hidden
# tiles; "split": a program per hidden tile). The first row is the baseline of the ratios.
# An H100 (session 2026-11-26) gave the walking kernel the same time at BN 32 / 64 / 128 and
# ran its backward at BN 16 (shared memory): its time is latency, not tile size.
DEFAULT_SETTINGS = (
    "32/8/1/tf32/walk,32/8/1/tf32/split,32/4/1/tf32/split,16/4/1/tf32/split,"
    "16/8/1/tf32/split,64/8/1/tf32/split,32/4/2/tf32/split"
)


def parse_lengths(text: str) -> list[int]:
    return [int(t[:-1]) * 1024 if t.endswith("k") else int(t) for t in text.split(",")]


def inputs(length: int, dtype: torch.dtype, seed: int = 0, device: str = "cuda") -> dict:
    """The memory op's inputs: unit q / k, small steps, as the tests' depth-2 cases."""
    from models.ops.memory import MemoryState

    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, HEADS, length)

    def rnd(*s: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*s, device=device, generator=g) * scale

    q, k = (torch.nn.functional.normalize(rnd(*shape, HEAD_DIM), dim=-1) for _ in range(2))
    w1 = rnd(1, HEADS, HEAD_DIM, HIDDEN, scale=HEAD_DIM**-0.5)
    w2 = rnd(1, HEADS, HIDDEN, HEAD_DIM, scale=HIDDEN**-0.5)
    return {
        "q": q.to(dtype).requires_grad_(),
        "k": k.to(dtype).requires_grad_(),
        "v": rnd(*shape, HEAD_DIM).to(dtype).requires_grad_(),
        # the stable regime of tests/unit/test_memory_triton.py's depth-2 cases
        "theta": (0.05 * torch.sigmoid(rnd(*shape))).requires_grad_(),
        "alpha": torch.sigmoid(rnd(*shape) - 2.0).requires_grad_(),
        "eta": torch.sigmoid(rnd(*shape)).requires_grad_(),
        "state": MemoryState((w1, w2), None),
    }


Setting = tuple[int, int, int, str, str]


def parse_settings(text: str) -> list[Setting]:
    out = []
    for item in text.split(","):
        bn, warps, stages, prec, kernel = item.split("/")
        if kernel not in ("walk", "split"):
            raise SystemExit(f"setting {item!r}: kernel must be 'walk' or 'split', got {kernel!r}")
        out.append((int(bn), int(warps), int(stages), prec, kernel))
    return out


def step(kw: dict, setting: Setting) -> torch.Tensor:
    """One forward + backward with these launch settings; returns y (detached)."""
    from models.ops.memory.triton import memory_triton

    bn, warps, stages, prec, kernel = setting
    for name in ("q", "k", "v", "theta", "alpha", "eta"):
        kw[name].grad = None
    y, st = memory_triton(
        kw["q"], kw["k"], kw["v"], kw["theta"], kw["alpha"], kw["eta"], kw["state"], CHUNK,
        block_n=bn, num_warps=(warps, warps), num_stages=stages, precision=prec,
        split=kernel == "split",
    )  # fmt: skip
    (y.float().square().mean() + sum(w.square().mean() for w in st.weights)).backward()
    return y.detach().float()


def compile_one(setting: Setting, dtype: torch.dtype) -> str:
    """Child process: compile this setting into Triton's disk cache (a short run). 16 chunks:
    Triton specializes integer arguments divisible by 16, as L and NT are at 2k / 8k / 32k (an
    odd length here compiled a variant the timed runs could not use)."""
    try:
        step(inputs(16 * CHUNK, dtype), setting)
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the parent prints it as the row's result
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def time_setting(kw: dict, setting: Setting, iters: int) -> tuple[float, torch.Tensor]:
    """Median ms of fwd + bwd after two warm-up calls, and the output."""
    from kernels_gpu import time_fwd_bwd  # beside this script: the CUDA-event timer

    from models.ops.memory import triton as tm

    ms = time_fwd_bwd(lambda: step(kw, setting), 2, iters)
    y = step(kw, setting)
    names = ("mlp_split_fwd", "mlp_split_bwd") if setting[4] == "split" else ("mlp_fwd", "mlp_bwd")
    ran = tuple(tm.LAUNCHED.pop(n, None) for n in names)
    if ran != (setting[0], setting[0]):
        print(f"    note: {setting} ran with BN (fwd, bwd) = {ran} (shared-memory fallback)")
    return ms, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", default="8k", help="comma-separated, e.g. 2k,8k,32k")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="BN/warps/stages/dots/kernel,...")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile processes")
    ap.add_argument("--compile-only", action="store_true", help="fill Triton's cache, no timing")
    ap.add_argument("--compile", default=None, help=argparse.SUPPRESS)  # child: one setting
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("memory_triton_tiles.py needs CUDA (the compiled kernels)")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if a.compile:
        print(compile_one(parse_settings(a.compile)[0], dtype))
        return
    settings = parse_settings(a.settings)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {a.dtype}; "
          f"B 1, H {HEADS}, D {HEAD_DIM}, hidden {HIDDEN}, chunk {CHUNK}, momentum")  # fmt: skip
    status = {}
    for i in range(0, len(settings), a.jobs):
        batch = settings[i : i + a.jobs]
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--dtype", a.dtype, "--compile", "/".join(map(str, s))],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for s in batch
        ]
        for s, p in zip(batch, procs, strict=True):
            out = p.communicate()[0].strip().splitlines()
            status[s] = out[-1] if out else f"exit {p.returncode}"
            print(f"  compiled {s}: {status[s]}", flush=True)
    if a.compile_only:
        return
    print(f"first row = the baseline of the ratios: {settings[0]}")
    print("| L | BN | warps | stages | dots | kernel | ms fwd+bwd | tok/s | vs first | rel-RMS y |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in parse_lengths(a.lengths):
        kw = inputs(length, dtype)
        base_ms, base_y = None, None
        for s in settings:
            cells = "| " + " | ".join(map(str, (length, *s))) + " |"
            if status[s] != "ok":
                print(f"{cells} {status[s]} | | | |")
                continue
            ms, y = time_setting(kw, s, a.iters)
            if base_ms is None:
                base_ms, base_y = ms, y
            rel = ((y - base_y).square().mean() / base_y.square().mean()).sqrt().item()
            tok_s = length / ms * 1e3
            print(f"{cells} {ms:.2f} | {tok_s:,.0f} | {base_ms / ms:.2f}x | {rel:.1e} |")


if __name__ == "__main__":
    main()
