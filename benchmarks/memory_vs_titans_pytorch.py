"""Neural memory, fwd+bwd: our NeuralMemory beside titans-pytorch's at the same config.

Config: dim 256, 4 heads of 64, chunk 64, depth-2 MLP memory with expansion 4, batch 1, fp32.
titans-pytorch runs in its `batch_size=64` mode (gradients at the start of each 64-token
window, like ours) and in its default mode (every gradient at the segment's initial weights).
Each (implementation, length) runs in a fresh subprocess, so its peak RSS (ru_maxrss) is that
configuration's alone. Reported: best-of-N tokens/s of forward + backward of mean(y²), peak RSS,
"step MB" (peak minus the RSS with imports, module and input in place: what the steps add),
ratios ours / theirs, our achieved GFLOP/s (matmul FLOPs counted by torch's FlopCounter), and
the ceiling: our tok/s if every FLOP ran at the matmul peak measured in the same run.

The two do different work per token. Ours writes every token into the memory and retrieves
token t with the weights after token t (the dual form costs b x width extra per token);
titans-pytorch writes one averaged update per 64-token chunk and retrieves chunk n with the
weights after chunk n-1.

    python benchmarks/memory_vs_titans_pytorch.py [--lengths 2k,8k,32k] [--repeats 3]
        [--impls ours,ours-ckpt,titans-bs64,titans] [--threads 2] [--bs64-max-len 8k] [--rounds 2]
    python benchmarks/memory_vs_titans_pytorch.py --device cuda --dtype bf16 \
        --impls ours,ours-triton,titans-bs64,titans

GPU variant (--device cuda): every configuration runs in this one process, timed with CUDA
synchronisation; "peak" is torch.cuda.max_memory_allocated of that configuration, reset
before it. --dtype bf16 casts the module and its input to bf16 (titans-pytorch fails under
CUDA autocast: its TorchScript scan gets mixed dtypes); our memory op still computes in fp32.
"ours-triton" is our NeuralMemory with impl="triton" (the fused kernels; CUDA only).
"ours-ckpt" is ours with recompute_every=512: 512-token pieces, each recomputed in backward
(before the layer had one recompute knob, it recomputed ~sqrt(n) groups of chunks inside the op).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM, HEADS, HEAD_DIM, CHUNK, DEPTH, EXPANSION = 256, 4, 64, 64, 2, 4
RECOMPUTE_EVERY = 8 * CHUNK  # "ours-ckpt": the recipes' mem_recompute_every (512 tokens)
IMPLS = ("ours", "ours-ckpt", "ours-triton", "titans-bs64", "titans")
DEFAULT_IMPLS = ("ours", "ours-ckpt", "titans-bs64", "titans")  # + ours-triton with --device cuda
PEAK_GFLOPS = {"fp32 2 threads": 300, "64-wide batched matmul": 80}  # from the brief


def build(impl: str) -> torch.nn.Module:
    """The module under test; same widths, heads, chunk and memory MLP for all."""
    if impl.startswith("ours"):
        from models.layers.neural_memory import NeuralMemory

        return NeuralMemory(
            DIM,
            HEADS,
            CHUNK,
            depth=DEPTH,
            expansion=EXPANSION,
            recompute_every=RECOMPUTE_EVERY if impl == "ours-ckpt" else 0,
            impl="triton" if impl == "ours-triton" else "chunked",
        )
    from titans_pytorch import NeuralMemory as TitansNeuralMemory

    return TitansNeuralMemory(
        dim=DIM,
        chunk_size=CHUNK,
        heads=HEADS,
        dim_head=HEAD_DIM,
        batch_size=64 if impl == "titans-bs64" else None,
        default_model_kwargs={"depth": DEPTH, "expansion_factor": float(EXPANSION)},
    )


def measured_peaks(threads: int) -> dict[str, float]:
    """fp32 matmul GFLOP/s this machine gives now: one large GEMM and the 64-wide batched
    shapes the memory op is made of, best of 5 (the ceiling for our GFLOP/s figures)."""
    torch.set_num_threads(threads)
    out = {}
    for name, (b, m, k, n) in {
        "2048^3 GEMM": (1, 2048, 2048, 2048),
        "bmm 128 x (64x64 @ 64x256)": (128, 64, 64, 256),
    }.items():
        x, y = torch.randn(b, m, k), torch.randn(b, k, n)
        torch.bmm(x, y)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            torch.bmm(x, y)
            best = min(best, time.perf_counter() - t0)
        out[name] = round(2 * b * m * k * n / best / 1e9, 1)
    return out


def _timed_steps(mod: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    """One warm-up fwd+bwd (Triton compiles here), then `repeats` timed ones (seconds)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step() -> None:
        mod.zero_grad(set_to_none=True)
        mod(x)[0].float().square().mean().backward()

    step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _result(impl: str, length: int, times: list[float], peak_mb: float, ready_mb: float) -> dict:
    return {
        "impl": impl,
        "length": length,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "tok_s": length / min(times),
        "peak_rss_mb": peak_mb,
        "step_mb": peak_mb - ready_mb,
    }


def worker(impl: str, length: int, repeats: int, threads: int) -> dict:
    """Runs in its own process, so ru_maxrss is this configuration's peak alone."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mod, x = build(impl), torch.randn(1, length, DIM)
    # ready = the process with its imports, module and input, before any step: peak - ready
    # is what the steps themselves add (titans-pytorch's imports weigh more than ours).
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = _timed_steps(mod, x, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _result(impl, length, times, peak, rss_ready)


def worker_cuda(impl: str, length: int, repeats: int, dtype: str) -> dict:
    """GPU variant, in-process; peak is max_memory_allocated, reset before the module."""
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    mod = build(impl).to(device="cuda", dtype=dt)
    times = _timed_steps(mod, torch.randn(1, length, DIM, device="cuda", dtype=dt), repeats)
    return _result(impl, length, times, torch.cuda.max_memory_allocated() / 2**20, 0.0)


def run_cuda(impl: str, length: int, repeats: int, dtype: str) -> dict:
    """One GPU configuration; an exception (OOM, an unsupported op) becomes the table cell."""
    try:
        return worker_cuda(impl, length, repeats, dtype)
    except Exception as exc:  # noqa: BLE001 - reported in the table, never swallowed
        torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


def count_flops(impl: str, length: int) -> float:
    """Matmul FLOPs of one fwd+bwd step (grouped convs are left out: the counter treats a
    depthwise conv as dense; ours costs ~0.1 MFLOP per token)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    mod = build(impl)
    x = torch.randn(1, length, DIM)
    with FlopCounterMode(display=False) as counter:
        mod(x)[0].square().mean().backward()
    per_op = counter.get_flop_counts()["Global"]
    return float(sum(v for op, v in per_op.items() if "conv" not in str(op)))


def print_ceilings(
    flops_per_tok: float, peaks: dict[str, float], results: dict, lengths: list[int]
) -> None:
    """What the goals ask of this CPU: our tok/s if every FLOP ran at a measured matmul peak,
    as a multiple of each baseline, beside the goal. Shows whether a goal is reachable at all
    with this much work per token (the exact recurrence's FLOPs are fixed by the config)."""
    goals = {"titans-bs64": 10.0, "titans": 3.0}
    for name, peak in peaks.items():
        ceiling = peak * 1e9 / flops_per_tok
        cells = []
        for length in lengths:
            for impl, goal in goals.items():
                base = results.get((impl, length), {}).get("tok_s")
                if base:
                    cells.append(f"L={length} {ceiling / base:.1f}x {impl} (goal {goal:g}x)")
        print(f"ceiling at {name} ({peak} GFLOP/s): {ceiling:,.0f} tok/s = {'; '.join(cells)}")


def _best(old: dict | None, new: dict) -> dict:
    """Merge two runs of one config: the faster run's timings, the larger peak memory."""
    if old is None or "tok_s" not in old:
        return new
    if "tok_s" not in new:
        return old
    best = dict(new if new["tok_s"] > old["tok_s"] else old)
    best["peak_rss_mb"] = max(old["peak_rss_mb"], new["peak_rss_mb"])
    best["step_mb"] = max(old["step_mb"], new["step_mb"])
    return best


def run_isolated(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"worker exited with code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_lengths(text: str) -> list[int]:
    return [int(float(t[:-1]) * 1024) if t.endswith("k") else int(t) for t in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2k,8k,32k", help="comma list, e.g. 2k,8k,32k or 4096")
    ap.add_argument("--impls", default=None, help=f"subset of {IMPLS}")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per config (best kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="CPU: run the whole set this many times, interleaved, keeping each config's best "
        "tok/s (and its largest peak): a shared machine's slow minutes hit every impl alike",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: module and input in bf16"
    )
    ap.add_argument(
        "--bs64-max-len",
        default="8k",
        help="longest L for titans-bs64: its RSS grows ~0.5 GB per 1k tokens (4.2 GB at 8k), "
        "so 32k would need ~16 GB of a shared machine's memory",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--flops", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        impl, length = a.worker.split(":")
        print(json.dumps(worker(impl, int(length), a.repeats, a.threads)))
        return
    if a.flops:
        impl, length = a.flops.split(":")
        print(json.dumps({"flops": count_flops(impl, int(length))}))
        return

    default = (*DEFAULT_IMPLS, "ours-triton") if a.device == "cuda" else DEFAULT_IMPLS
    lengths, impls = parse_lengths(a.lengths), (a.impls or ",".join(default)).split(",")
    bad = sorted(set(impls) - set(IMPLS))
    if bad:
        raise SystemExit(f"unknown --impls {bad}; choose from {IMPLS}")
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    if not cuda and (a.dtype != "fp32" or "ours-triton" in impls):
        raise SystemExit("--dtype bf16 and ours-triton need --device cuda")
    where = (
        f"GPU {torch.cuda.get_device_name()}"
        if cuda
        else f"{a.threads} threads, {os.cpu_count()} CPUs"
    )
    print(
        f"torch {torch.__version__}, {where}, "
        f"load avg at start {os.getloadavg()[0]:.1f} (shared machine: figures may read low)"
    )
    print(
        f"config: dim {DIM}, {HEADS} heads x {HEAD_DIM}, chunk {CHUNK}, depth-{DEPTH} MLP "
        f"memory x{EXPANSION}, batch 1, {a.dtype}; fwd+bwd, best of {a.repeats}"
        + ("; 'RSS' columns are peak CUDA memory allocated" if cuda else "")
    )
    flops_per_tok = {}
    for impl in ("ours", "ours-ckpt"):
        if impl in impls and not cuda:
            n = min(lengths)
            flops_per_tok[impl] = run_isolated(["--flops", f"{impl}:{n}"]).get("flops", 0.0) / n

    results: dict[tuple[str, int], dict] = {}
    bs64_max = parse_lengths(a.bs64_max_len)[0]
    rounds = 1 if cuda else max(1, a.rounds)
    for length, impl in [(n, i) for _ in range(rounds) for n in lengths for i in impls]:
        if impl == "titans-bs64" and length > bs64_max and not cuda:
            results[impl, length] = {"error": f"skipped above --bs64-max-len {bs64_max}"}
            print(f"  [{length:>6}] {impl:<12} skipped (memory, see --bs64-max-len)")
            continue
        if cuda:
            results[impl, length] = r = run_cuda(impl, length, a.repeats, a.dtype)
            msg = r.get("error") or (
                f"{r['tok_s']:,.0f} tok/s (median {length / r['median_s']:,.0f}), "
                f"peak CUDA memory {r['peak_rss_mb']:,.0f} MB"
            )
            print(f"  [{length:>6}] {impl:<12} {msg}", flush=True)
            continue
        r = run_isolated(
            [
                "--worker",
                f"{impl}:{length}",
                "--repeats",
                str(a.repeats),
                "--threads",
                str(a.threads),
            ]
        )
        results[impl, length] = r = _best(results.get((impl, length)), r)
        msg = r.get("error") or (
            f"{r['tok_s']:,.0f} tok/s (median {length / r['median_s']:,.0f}), "
            f"peak RSS {r['peak_rss_mb']:,.0f} MB"
        )
        print(f"  [{length:>6}] {impl:<12} {msg}", flush=True)

    mine = [i for i in ("ours", "ours-ckpt", "ours-triton") if i in impls]
    # step MB = peak - RSS before the first step (CPU); on GPU both are the CUDA peak.
    heads = "".join(f" {m} ÷ it: tok/s | RSS | step MB |" for m in mine)
    print(f"\n| L | impl | tok/s | peak RSS MB | step MB |{heads}")
    print("|---|---|---|---|---|" + "---|---|---|" * len(mine))
    for length in lengths:
        for impl in impls:
            r = results[impl, length]
            if "error" in r:
                print(f"| {length} | {impl} | {r['error'][:70]} | | |" + " | | |" * len(mine))
                continue
            cells = ""
            for m in mine:
                o = results.get((m, length), {})
                if impl.startswith("titans") and "tok_s" in o:
                    cells += f" {o['tok_s'] / r['tok_s']:.2f}x |"
                    cells += f" {o['peak_rss_mb'] / r['peak_rss_mb']:.2f}x |"
                    cells += f" {o['step_mb'] / max(r['step_mb'], 1.0):.2f}x |"
                else:
                    cells += " | | |"
            print(
                f"| {length} | {impl} | {r['tok_s']:,.0f} | {r['peak_rss_mb']:,.0f} "
                f"| {r['step_mb']:,.0f} |{cells}"
            )
    print()
    for impl, fpt in flops_per_tok.items():
        rates = [
            f"L={n}: {fpt * results[impl, n]['tok_s'] / 1e9:.1f}"
            for n in lengths
            if "tok_s" in results.get((impl, n), {})
        ]
        print(
            f"{impl}: {fpt / 1e6:.2f} MFLOP/token (matmuls, fwd+bwd); achieved GFLOP/s "
            f"{', '.join(rates)}"
        )
    if not cuda:
        print(f"CPU reference peaks (GFLOP/s), from the brief: {PEAK_GFLOPS}")
        peaks = measured_peaks(a.threads)
        print(f"measured now, fp32 {a.threads} threads (GFLOP/s): {peaks}")
        if "ours" in flops_per_tok:
            print_ceilings(flops_per_tok["ours"], peaks, results, lengths)
    print(f"load avg at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
