"""Triton neural memory (forward and backward, depth 1 and 2) under TRITON_INTERPRET=1 vs the
token-by-token reference: outputs, final state and the gradient of every input and state.

The interpreter is slow, so shapes are tiny but odd: lengths that no chunk divides, chunk
sizes below their tile (masked rows), Dout / hidden tile caps of 32 so that several tiles
(depth-1 partial sums, depth-2 hidden passes) run. The env var must be set before
``triton.jit`` decorates the kernels, so the fixture imports the modules fresh under it.
Measured rel-RMS errors in fp32 are <= ~6e-7 (IEEE dots); TOL leaves >10x room.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

from models.ops.memory import MemoryRule, MemoryState, memory_chunked, memory_reference
from models.ops.memory import neural_memory as dispatch
from tests._testing import assert_close

TOL = 1e-5  # relative RMS, fp32 both sides
BF16_TOL = 2e-2  # bf16 q/k/v rounding, fp32 kernels
B = 2
MODULES = (
    "models.ops.memory.triton",
    "models.ops.memory.triton_kernels",
    "models.ops.memory.triton_kernels.primitives",
    "models.ops.memory.triton_kernels.linear",
    "models.ops.memory.triton_kernels.mlp_tiles",
    "models.ops.memory.triton_kernels.mlp_walk",
    "models.ops.memory.triton_kernels.mlp_split",
)


@pytest.fixture(scope="module")
def triton_memory():
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    for name in MODULES:
        sys.modules.pop(name, None)
    module = importlib.import_module(MODULES[0])
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny numpy/torch ops: one thread is faster on the shared box
    yield module
    torch.set_num_threads(prev)
    for name in MODULES:
        sys.modules.pop(name, None)
    patch.undo()


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """fla's conftest habit: an output element the kernels never write shows up as NaN."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def nan(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **kw: nan(new_empty(t, *a, **kw)))


def _inputs(
    length: int, heads: int, dims: list[int], momentum: bool, seed: int = 0, device: str = "cpu"
) -> tuple[dict, list[str]]:
    """Keyword inputs (learnable (H, ...) initial weights, (B, H, ...) momentum) + grad names."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device)
    d_in, d_out = dims[0], dims[-1]
    step = 0.5 if len(dims) == 2 else 0.05  # stable regime, as in test_memory_op.py
    kw = {
        "q": F.normalize(r(B, heads, length, d_in), dim=-1),
        "k": F.normalize(r(B, heads, length, d_in), dim=-1),
        "v": r(B, heads, length, d_out),
        "theta": step * torch.sigmoid(r(B, heads, length)),
        "alpha": torch.sigmoid(r(B, heads, length) - 2.0),  # mean decay ~0.12 per token
        "eta": torch.sigmoid(r(B, heads, length)) if momentum else None,
    }
    ws = [r(heads, a, b) / a**0.5 for a, b in zip(dims[:-1], dims[1:])]
    moms = [0.01 * r(B, heads, *w.shape[-2:]) for w in ws] if momentum else None
    names = [n for n in ("q", "k", "v", "theta", "alpha", "eta") if kw[n] is not None]
    for t in [kw[n] for n in names] + ws + (moms or []):
        t.requires_grad_()
    kw["state"] = MemoryState(tuple(ws), None if moms is None else tuple(moms))
    return kw, names


def _run(fn, kw: dict, names: list[str], chunk: int, rule: MemoryRule, **extra) -> dict:
    """Outputs, final state and the gradients of a random linear function of all of them."""
    y, st = fn(chunk_size=chunk, rule=rule, **kw, **extra)
    res = {"y": y}
    res.update({f"W{i}": w for i, w in enumerate(st.weights)})
    res.update({f"S{i}": s for i, s in enumerate(st.momentum or ())})
    g = torch.Generator().manual_seed(123)
    loss = sum(
        (t.float() * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in res.values()
    )
    leaves = {n: kw[n] for n in names}
    leaves.update({f"W{i}_init": w for i, w in enumerate(kw["state"].weights)})
    leaves.update({f"S{i}_init": s for i, s in enumerate(kw["state"].momentum or ())})
    grads = torch.autograd.grad(loss, list(leaves.values()))
    res.update({f"d{n}": gr for n, gr in zip(leaves, grads)})
    return res


def _check(ref: dict, out: dict, tol: float) -> None:
    assert ref.keys() == out.keys()
    for name in ref:
        assert_close(name, ref[name].float(), out[name].float(), tol)


CASES = [
    # (length, chunk, heads, layer widths, momentum, residual); tile caps BV = BN = 32, so the
    # tiles differ (BT, BK, BN, BV) and a misplaced axis cannot pass by symmetry
    (37, 8, 3, [8, 8], True, True),  # linear memory, chunk below the 16-row tile
    (70, 24, 2, [16, 40], False, True),  # chunk 24 in a 32-row tile; Dout 40 = two tiles
    (37, 8, 2, [16, 64, 16], True, True),  # Titans MLP memory, two hidden tiles of 32
    (70, 16, 3, [8, 48, 24], False, False),  # no residual, Din != Dout, partial hidden tile
    (5, 16, 2, [8, 8], True, True),  # one partial chunk
]


@pytest.mark.parametrize(
    "length,chunk,heads,dims,momentum,residual",
    CASES,
    ids=[
        f"L{c[0]}-b{c[1]}-H{c[2]}-{'x'.join(map(str, c[3]))}-{'mom' if c[4] else 'nomom'}"
        + ("" if c[5] else "-nores")
        for c in CASES
    ],
)
def test_triton_matches_reference(triton_memory, length, chunk, heads, dims, momentum, residual):
    rule = MemoryRule(residual=residual)
    kw, names = _inputs(length, heads, dims, momentum)
    ref = _run(memory_reference, kw, names, chunk, rule)
    out = _run(triton_memory.memory_triton, kw, names, chunk, rule, block_v=32, block_n=32)
    _check(ref, out, TOL)


SPLIT_CASES = [c for c in CASES if len(c[3]) == 3] + [
    (150, 64, 2, [16, 64, 16], True, True),  # the benchmark's chunk, 3 chunks (2 slots reused)
    (5, 16, 2, [16, 32, 16], True, True),  # one partial chunk: no next-chunk work at all
]


@pytest.mark.parametrize(
    "length,chunk,heads,dims,momentum,residual",
    SPLIT_CASES,
    ids=[f"L{c[0]}-b{c[1]}-{'x'.join(map(str, c[3]))}-{c[4]}-{c[5]}" for c in SPLIT_CASES],
)
def test_triton_split_matches_reference(
    triton_memory, length, chunk, heads, dims, momentum, residual
):
    """split=True (depth 2: a program per hidden tile, partial sums through buffers between
    launches, two slots by chunk parity) against the token loop; hidden tiles of 16 so that 2-4
    programs share a group, one of them partial in the 48-wide case."""
    rule = MemoryRule(residual=residual)
    kw, names = _inputs(length, heads, dims, momentum)
    ref = _run(memory_reference, kw, names, chunk, rule)
    out = _run(triton_memory.memory_triton, kw, names, chunk, rule, block_n=16, split=True)
    _check(ref, out, TOL)


def test_triton_bf16_inputs(triton_memory):
    """bf16 q/k/v: y and its gradients come back in bf16, the state in fp32."""
    rule = MemoryRule()
    kw, names = _inputs(21, 2, [8, 8], momentum=True)
    for n in ("q", "k", "v"):
        kw[n] = kw[n].detach().bfloat16().requires_grad_()
    ref_kw = dict(kw, **{n: kw[n].detach().float().requires_grad_() for n in ("q", "k", "v")})
    ref = _run(memory_reference, ref_kw, names, 8, rule)
    out = _run(triton_memory.memory_triton, kw, names, 8, rule)
    assert out["y"].dtype == out["dq"].dtype == torch.bfloat16
    assert out["W0"].dtype == torch.float32
    _check(ref, out, BF16_TOL)


@pytest.mark.parametrize("dims", [[8, 8], [16, 64, 16]], ids=["linear", "mlp"])
def test_triton_launch_settings(triton_memory, dims):
    """Warps, stages, tiles and precision="tf32" are launch choices only: same values and
    gradients as the reference (tf32 within bf16-input tolerance: the interpreter rounds
    like IEEE); an unknown precision is refused by name."""
    rule = MemoryRule()
    kw, names = _inputs(37, 2, dims, momentum=True)
    ref = _run(memory_reference, kw, names, 8, rule)
    other = dict(block_n=16, block_v=16, num_warps=(2, 4), num_stages=2)
    _check(ref, _run(triton_memory.memory_triton, kw, names, 8, rule, **other), TOL)
    tf32 = _run(triton_memory.memory_triton, kw, names, 8, rule, precision="tf32")
    _check(ref, tf32, BF16_TOL)
    with pytest.raises(ValueError, match="precision"):
        triton_memory.memory_triton(chunk_size=8, rule=rule, precision="bf16", **kw)


def test_triton_saturated_gates(triton_memory):
    """α = 1 (full forget) and η = 0 (no carry) hit the log-gate bounds chunked.py uses: same
    values and gradients as the chunked form, nothing infinite."""
    rule = MemoryRule()
    kw, names = _inputs(19, 2, [8, 8], momentum=True, seed=3)
    with torch.no_grad():
        kw["alpha"][..., ::5] = 1.0
        kw["eta"][..., ::7] = 0.0
    ref = _run(memory_chunked, kw, names, 8, rule)
    out = _run(triton_memory.memory_triton, kw, names, 8, rule)
    _check(ref, out, TOL)


def test_triton_dispatch(triton_memory):
    """impl="triton" runs the kernels; impl="auto" on CPU is exactly the chunked form."""
    rule = MemoryRule()
    kw, _ = _inputs(19, 2, [8, 8], momentum=True)
    with torch.no_grad():
        y_t, st_t = dispatch(chunk_size=8, rule=rule, impl="triton", **kw)
        y_d, st_d = triton_memory.memory_triton(chunk_size=8, rule=rule, **kw)
        y_a, st_a = dispatch(chunk_size=8, rule=rule, impl="auto", **kw)
        y_c, st_c = memory_chunked(chunk_size=8, rule=rule, **kw)
    assert torch.equal(y_t, y_d) and torch.equal(st_t.weights[0], st_d.weights[0])
    assert torch.equal(y_a, y_c) and torch.equal(st_a.momentum[0], st_c.momentum[0])
    assert_close("triton vs chunked", y_c, y_t, TOL)


@pytest.mark.parametrize(
    "rule,dims,match",
    [
        (MemoryRule(attn_bias="huber"), [8, 8], "attn_bias"),
        (MemoryRule(retention="lq"), [8, 8], "retention"),  # Moneta: not covered by Triton
        (MemoryRule(retention="kl"), [8, 8], "retention"),  # Memora: not covered either
        (MemoryRule(), [8, 16, 16, 8], "depth"),
        (MemoryRule(), [8, 160], "head dims"),
        (MemoryRule(norm=True), [8, 16, 8], "LayerNorm"),
    ],
    ids=["huber", "lq", "kl", "depth3", "wide", "norm"],
)
def test_triton_rejects_unsupported(triton_memory, rule, dims, match):
    kw, _ = _inputs(4, 2, dims, momentum=False)
    with pytest.raises(ValueError, match=match):
        dispatch(chunk_size=4, rule=rule, impl="triton", **kw)
    assert triton_memory.unsupported_reason(kw["q"], kw["v"], kw["state"], rule) is not None


def test_triton_rejects_float64_and_norm(triton_memory):
    """float64 computes in float64 (the op's dtype rule), which the fp32 kernels cannot: refused
    with a reason, as is the memory's LayerNorm, so impl="auto" (on CUDA) takes the chunked form
    for both; fp32 with norm=False stays covered."""
    kw, _ = _inputs(4, 2, [8, 16, 8], momentum=False)
    kw = {n: (t.detach().double() if torch.is_tensor(t) else t) for n, t in kw.items()}
    kw["state"] = MemoryState(tuple(w.detach().double() for w in kw["state"].weights))
    with pytest.raises(ValueError, match="float64"):
        dispatch(chunk_size=4, rule=MemoryRule(), impl="triton", **kw)
    q, v, st = kw["q"], kw["v"], kw["state"]
    assert triton_memory.unsupported_reason(q.float(), v, st, MemoryRule()) is None
    assert "LayerNorm" in triton_memory.unsupported_reason(q.float(), v, st, MemoryRule(norm=True))


def test_triton_on_cpu_needs_interpreter(triton_memory, monkeypatch):
    """Kernels imported without TRITON_INTERPRET=1 cannot take CPU tensors: say so clearly."""
    kw, _ = _inputs(4, 2, [8, 8], momentum=False)
    monkeypatch.setattr(triton_memory, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dispatch(chunk_size=4, rule=MemoryRule(), impl="triton", **kw)


def test_triton_rejects_channelwise_gates(triton_memory):
    """Channel-wise theta / alpha (B, H, L, Din; Miras) are not what the kernels load (one gate
    per head and token): refused with a reason, so impl="auto" takes the chunked form; the
    same arguments with per-head gates stay covered."""
    kw, _ = _inputs(4, 2, [8, 8], momentum=False)
    kw = {n: (t.detach() if torch.is_tensor(t) else t) for n, t in kw.items()}
    kw["theta"] = kw["theta"][..., None].expand(-1, -1, -1, 8)
    kw["alpha"] = kw["alpha"][..., None].expand(-1, -1, -1, 8)
    with pytest.raises(ValueError, match="channel-wise"):
        dispatch(chunk_size=4, rule=MemoryRule(), impl="triton", **kw)
    q, v, st = kw["q"], kw["v"], kw["state"]
    assert "channel-wise" in triton_memory.unsupported_reason(q, v, st, MemoryRule(), kw["theta"])
    assert triton_memory.unsupported_reason(q, v, st, MemoryRule(), kw["theta"][..., 0]) is None
    # Only alpha channel-wise (a mix the kernels would read as a wrong-shaped buffer): refused.
    mixed = triton_memory.unsupported_reason(
        q, v, st, MemoryRule(), kw["theta"][..., 0], kw["alpha"]
    )
    assert mixed is not None and "alpha" in mixed
