"""GPU kernel benchmark: forward + backward time of our Triton ops beside their baselines.

Retention (bf16, default B 4, H 16, D 128, T 2k..16k): our Triton chunkwise kernel vs fla's
``chunk_retention`` (column skipped with a note when fla is not installed) vs our PyTorch
chunked path, as a table with ratios (> 1 means ours is faster). Memory slot: the neural-memory
Triton kernels (``models.ops.memory.triton``, depth 1 and the depth-2 MLP memory) vs their
chunked form, with the output's rel-RMS difference; skipped with a note if that module is gone.
Needs CUDA; ``--help`` works anywhere.

    python benchmarks/kernels_gpu.py                 # full table
    python benchmarks/kernels_gpu.py --T 2048 --iters 5
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from models.ops.retention import retention, retnet_decay  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--T", default="2048,4096,8192,16384", help="comma-separated sequence lengths")
    p.add_argument("--B", type=int, default=4, help="batch size")
    p.add_argument("--H", type=int, default=16, help="heads")
    p.add_argument("--D", type=int, default=128, help="head dim (key = value)")
    p.add_argument("--chunk", type=int, default=64, help="chunk size of ours (Triton and chunked)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--warmup", type=int, default=3, help="untimed calls (Triton compiles here)")
    p.add_argument("--iters", type=int, default=10, help="timed calls; the median is reported")
    p.add_argument("--skip-chunked", action="store_true", help="leave out the PyTorch chunked path")
    p.add_argument("--skip-memory", action="store_true", help="leave out the memory-kernel slot")
    return p.parse_args(argv)


def time_fwd_bwd(step: Callable[[], None], warmup: int, iters: int) -> float:
    """Median milliseconds of one forward + backward, timed with CUDA events."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _fwd_bwd_step(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], do: torch.Tensor):
    def step() -> None:
        for t in leaves:
            t.grad = None
        fn().backward(do)

    return step


def _load_fla() -> tuple[Callable | None, str]:
    try:
        from fla.ops.retention import chunk_retention
    except Exception as exc:  # ImportError, or fla failing to import against this torch/triton
        return None, f"fla not available ({type(exc).__name__}: {exc}); fla column skipped"
    return chunk_retention, "fla.ops.retention.chunk_retention"


def _cell(fn: Callable[[], float]) -> float | str:
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def _fmt(x: float | str) -> str:
    return f"{x:9.2f}" if isinstance(x, float) else f"{x:>9}"


def _ratio(num: float | str, den: float | str) -> str:
    ok = isinstance(num, float) and isinstance(den, float)
    return f"{num / den:8.2f}x" if ok else f"{'-':>9}"


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)


def _retention_row(args: argparse.Namespace, T: int, dtype: torch.dtype, fla_fn) -> str:
    B, H, D = args.B, args.H, args.D
    decay = retnet_decay(H, device="cuda")
    q, k, v = (_randn(B, H, T, D, dtype=dtype, seed=T + i).requires_grad_() for i in range(3))
    do = _randn(B, H, T, D, dtype=dtype, seed=T + 3)

    def ours(mode: str) -> Callable[[], torch.Tensor]:
        return lambda: retention(q, k, v, decay, mode=mode, chunk_size=args.chunk)[0]

    def timed(fn, leaves, grad, iters, label) -> float | str:
        step = _fwd_bwd_step(fn, leaves, grad)
        ms = _cell(lambda: time_fwd_bwd(step, args.warmup, iters))
        print(f"#   T={T} {label}: {ms} ms", file=sys.stderr, flush=True)  # progress, if cut off
        return ms

    t_tri = timed(ours("triton"), [q, k, v], do, args.iters, "triton")
    t_chk: float | str = "skip"
    if not args.skip_chunked:
        t_chk = timed(ours("chunked"), [q, k, v], do, max(1, args.iters // 2), "chunked")
    t_fla: float | str = "n/a"
    err = "-"
    if fla_fn is not None:
        # fla's layout is (B, T, H, D); the transposes happen outside the timed region
        qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        dof = do.transpose(1, 2).contiguous()
        params = inspect.signature(fla_fn).parameters
        kw = {"head_first": False} if "head_first" in params else {}

        def fla_o() -> torch.Tensor:
            return fla_fn(qf, kf, vf, **kw)[0]

        t_fla = timed(fla_o, [qf, kf, vf], dof, args.iters, "fla")
        with torch.no_grad():
            ref, out = fla_o().transpose(1, 2).float(), ours("triton")().float()
            err = f"{((ref - out).pow(2).mean() / ref.pow(2).mean()).sqrt().item():.2e}"
    row = f"{T:>6} {_fmt(t_tri)} {_fmt(t_fla)} {_fmt(t_chk)} {_ratio(t_fla, t_tri)}"
    return row + f" {_ratio(t_chk, t_tri):>10} {err:>13}"


def bench_retention(args: argparse.Namespace, dtype: torch.dtype) -> None:
    fla_fn, fla_note = _load_fla()
    print(f"\n## retention fwd+bwd, {dtype}, B={args.B} H={args.H} D={args.D}, chunk {args.chunk}")
    print(f"# ms (median); fla: {fla_note}")
    head = f"{'T':>6} {'triton':>9} {'fla':>9} {'chunked':>9} {'fla/ours':>9} {'chunk/ours':>10}"
    print(head + f" {'relerr vs fla':>13}")
    for T in [int(t) for t in args.T.split(",")]:
        print(_retention_row(args, T, dtype, fla_fn), flush=True)
        torch.cuda.empty_cache()


def _memory_row(
    args: argparse.Namespace, T: int, dtype: torch.dtype, mem, tri_fn, depth: int
) -> str:
    B, H, D = args.B, args.H, args.D
    q, k, v = (_randn(B, H, T, D, dtype=dtype, seed=T + i).requires_grad_() for i in range(3))
    do = _randn(B, H, T, D, dtype=dtype, seed=T + 3)
    theta, alpha, eta = (torch.full((B, H, T), c, device="cuda") for c in (0.01, 0.001, 0.9))
    # depth 2 = Titans' MLP memory, hidden 4 D, residual (MemoryRule's default)
    dims = [D, D] if depth == 1 else [D, 4 * D, D]
    ws = [
        (torch.randn(H, a, b, device="cuda") * a**-0.5).requires_grad_()
        for a, b in zip(dims[:-1], dims[1:])
    ]
    state = mem.MemoryState(tuple(ws))
    times: list[float | str] = []
    for fn in (tri_fn, mem.memory_chunked):

        def run(fn=fn) -> torch.Tensor:
            return fn(q, k, v, theta, alpha, eta, state, args.chunk)[0]

        step = _fwd_bwd_step(run, [q, k, v, *ws], do)
        try:
            times.append(_cell(lambda step=step: time_fwd_bwd(step, args.warmup, args.iters)))
        except Exception as exc:  # another op's API may move: report it instead of crashing
            times.append(type(exc).__name__)
            print(f"# {getattr(fn, '__name__', fn)}: {exc}")
    err = "-"
    if all(isinstance(t, float) for t in times):
        with torch.no_grad():
            ref = mem.memory_chunked(q, k, v, theta, alpha, eta, state, args.chunk)[0].float()
            out = tri_fn(q, k, v, theta, alpha, eta, state, args.chunk)[0].float()
            err = f"{((ref - out).pow(2).mean() / ref.pow(2).mean()).sqrt().item():.2e}"
    row = f"{depth:>5} {T:>6} {_fmt(times[0])} {_fmt(times[1])} {_ratio(times[1], times[0]):>10}"
    return row + f" {err:>17}"


def bench_memory(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Neural-memory kernel (memory_chunked's contract) vs the chunked form, depth 1 and 2."""
    print(f"\n## neural memory (momentum) fwd+bwd, {dtype} q/k/v, B={args.B} H={args.H} D={args.D}")
    print(f"# chunk {args.chunk}; Triton vs chunked; ms (median)")
    if importlib.util.find_spec("models.ops.memory.triton") is None:
        print("# models.ops.memory.triton does not exist yet: memory slot skipped")
        return
    tri_mod = importlib.import_module("models.ops.memory.triton")
    mem = importlib.import_module("models.ops.memory")
    tri_fn = getattr(tri_mod, "memory_triton", None)
    if tri_fn is None:
        print(f"# models.ops.memory.triton has no memory_triton(); found {dir(tri_mod)}: skipped")
        return
    print(f"{'depth':>5} {'T':>6} {'triton':>9} {'chunked':>9} {'chunk/ours':>10}", end="")
    print(f" {'relerr vs chunked':>17}")
    for depth in (1, 2):
        for T in [int(t) for t in args.T.split(",")]:
            print(_memory_row(args, T, dtype, mem, tri_fn, depth), flush=True)
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "kernels_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "run it on a GPU machine, e.g. through the device tool.",
            file=sys.stderr,
        )
        return 1
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}", end="")
    print(f", triton {importlib.import_module('triton').__version__}")
    bench_retention(args, dtype)
    if not args.skip_memory:
        bench_memory(args, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
