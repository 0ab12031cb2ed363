"""Moneta (lq) and Memora (kl) retention: what each token retrieves with, against loops written
here from the papers' equations (Miras, arXiv 2504.13173; docs/models.md, Miras).

The loops share nothing with models/ops/memory: the MLP, the surrogate output gradients, n(·)
and the softmax expansion are written out below from reference.py's docstring conventions
(gates: X_t = (1 - alpha_t) X_{t-1} - theta_t ∇ℓ; lp bias g = p tanh(a r) (r² + eps)^((p-1)/2);
n(A) = (Σ|A|^q + eps)^((q-2)/q) per matrix; W = c softmax(Λ) over the input axis). Gradients
of the loops come from autograd through them. float64 on both sides: the forms agree to ~1e-13,
so TOL = 1e-9 (relative RMS) leaves room for rounding only; before the chunk's last token read
the exact map, y alone was off by 3e-3 to 6e-2 (relative) on these inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from models.ops.memory import MemoryRule, MemoryState, memory_chunked, memory_reference, retrieve
from tests._testing import (
    assert_close,
    one_thread,  # noqa: F401  (autouse: this module runs on 1 thread)
)

TOL = 1e-9
B, H, D, HIDDEN = 2, 2, 8, 16
P, Q, SHARP, EPS, SCALE, LN_EPS = 3.0, 4.0, 10.0, 1e-6, 1.0, 1e-5

IMPLS = {
    "reference": memory_reference,
    "chunked": memory_chunked,
    "chunked-ckpt": partial(memory_chunked, checkpoint=True),
}
# name -> (attn_bias, retention, depth, norm, momentum); Miras' models run without momentum
MEMORIES = {
    "moneta-d1": ("lp", "lq", 1, False, False),
    "moneta-d2": ("lp", "lq", 2, True, False),  # the model's M(x) = x + LN(W2 gelu(W1 x))
    "memora": ("l2", "kl", 1, False, False),
    "memora-mom": ("l2", "kl", 1, False, True),
}


def _mlp(ws: list[torch.Tensor], x: torch.Tensor, norm: bool) -> torch.Tensor:
    if len(ws) == 1:
        return x @ ws[0]
    h = F.gelu(x @ ws[0]) @ ws[1]
    if norm:
        h = F.layer_norm(h, (h.shape[-1],), eps=LN_EPS)
    return x + h


def _out_grad(r: torch.Tensor, bias: str) -> torch.Tensor:
    if bias == "l2":
        return 2.0 * r
    return P * torch.tanh(SHARP * r) * (r * r + EPS) ** ((P - 1.0) / 2.0)


def _n(a: torch.Tensor) -> torch.Tensor:
    """Moneta's ||A||_q^(q-2), smoothed: per (batch, head) matrix."""
    return (a.abs().pow(Q).sum(dim=(-2, -1), keepdim=True) + EPS) ** ((Q - 2.0) / Q)


def _exact(xs: list[torch.Tensor], retention: str) -> list[torch.Tensor]:
    """W = f(X): A / n(A) (Moneta), c softmax(Λ) over the input axis (Memora)."""
    if retention == "lq":
        return [a / _n(a) for a in xs]
    return [SCALE * torch.softmax(lam, dim=-2) for lam in xs]


def _grads(ws: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, mem: tuple) -> tuple:
    """∇_W of the attentional bias at one token: the surrogate output gradient backpropagated."""
    bias, _, _, norm, _ = mem
    out = _mlp(ws, k, norm)
    return torch.autograd.grad(out, ws, _out_grad(out - v, bias), create_graph=True)


def _paper_rule(kw: dict, mem: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The papers' per-token recurrence (chunk size 1). Moneta:
    A_t = (1 - alpha_t) A_{t-1} - theta_t ∇ℓ_p(W_{t-1}; k_t, v_t), W_t = A_t / n(A_t);
    Memora: Λ_t = (1 - alpha_t) Λ_{t-1} - theta_t ∇_W ℓ2(W_{t-1}), W_t = c softmax(Λ_t);
    y_t = M_{W_t}(q_t)."""
    retention, norm = mem[1], mem[3]
    xs = [w.expand(B, *w.shape[-3:]) for w in kw["state"].weights]
    ys = []
    for t in range(kw["q"].shape[2]):
        w_prev = _exact(xs, retention)  # W_{t-1}
        grads = _grads(w_prev, kw["k"][:, :, t : t + 1], kw["v"][:, :, t : t + 1], mem)
        keep = 1.0 - kw["alpha"][:, :, t, None, None]
        th = kw["theta"][:, :, t, None, None]
        xs = [keep * x - th * g for x, g in zip(xs, grads)]
        ys.append(_mlp(_exact(xs, retention), kw["q"][:, :, t : t + 1], norm))
    return torch.cat(ys, dim=2), xs


def _chunked_rule(kw: dict, mem: tuple, chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Chunked training as the op defines it: gradients at the chunk-start weights
    W_{t'} = f(X_{t'}); token t reads A_t / n(A_{t'}) (Moneta) or the first-order expansion of
    the softmax around Λ_{t'} (Memora) — except a chunk's last token (t mod b = b - 1), which
    reads the exact f(X_t): no token reads a factor that holds later tokens, and a partial
    final chunk has no last token (outputs do not depend on where the call ends)."""
    retention, norm, momentum = mem[1], mem[3], mem[4]
    xs = [w.expand(B, *w.shape[-3:]) for w in kw["state"].weights]
    ss = [s.expand_as(x) for s, x in zip(kw["state"].momentum, xs)] if momentum else None
    length = kw["q"].shape[2]
    ys = []
    for t in range(length):
        if t % chunk == 0:
            x_start, w_start = xs, _exact(xs, retention)
        grads = _grads(w_start, kw["k"][:, :, t : t + 1], kw["v"][:, :, t : t + 1], mem)
        keep = 1.0 - kw["alpha"][:, :, t, None, None]
        th = kw["theta"][:, :, t, None, None]
        if momentum:
            eta = kw["eta"][:, :, t, None, None]
            ss = [eta * s - th * g for s, g in zip(ss, grads)]
            xs = [keep * x + s for x, s in zip(xs, ss)]
        else:
            xs = [keep * x - th * g for x, g in zip(xs, grads)]
        if t % chunk == chunk - 1:
            w_t = _exact(xs, retention)
        elif retention == "lq":
            w_t = [a / _n(a0) for a, a0 in zip(xs, x_start)]
        else:
            p0 = torch.softmax(x_start[0], dim=-2)
            pd = p0 * (xs[0] - x_start[0])
            w_t = [SCALE * (p0 + pd - p0 * pd.sum(dim=-2, keepdim=True))]
        ys.append(_mlp(w_t, kw["q"][:, :, t : t + 1], norm))
    return torch.cat(ys, dim=2), xs


def _inputs(mem: tuple, length: int, seed: int = 0) -> dict:
    """float64 leaves in the stable regime of each memory (test_memory_op's step sizes)."""
    bias, retention, depth, _, momentum = mem
    g = torch.Generator().manual_seed(seed)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float64)

    step = (0.5 if depth == 1 else 0.05) * (0.1 if bias == "lp" else 1.0)
    dims = [D, D] if depth == 1 else [D, HIDDEN, D]
    ws = [r(H, a, b) / a**0.5 * (3.0 if retention == "lq" else 1.0) for a, b in zip(dims, dims[1:])]
    kw = {
        "q": F.normalize(r(B, H, length, D), dim=-1),
        "k": F.normalize(r(B, H, length, D), dim=-1),
        "v": r(B, H, length, D),
        "theta": step * torch.sigmoid(r(B, H, length)),
        "alpha": torch.sigmoid(r(B, H, length) - 2.0) * (0.01 if retention == "lq" else 1.0),
        "eta": torch.sigmoid(r(B, H, length)) if momentum else None,
    }
    moms = [0.01 * r(B, H, *w.shape[-2:]) for w in ws] if momentum else None
    for t in [*kw.values(), *ws, *(moms or [])]:
        if t is not None:
            t.requires_grad_()
    kw["state"] = MemoryState(tuple(ws), None if moms is None else tuple(moms))
    return kw


def _leaves(kw: dict) -> dict[str, torch.Tensor]:
    out = {n: kw[n] for n in ("q", "k", "v", "theta", "alpha", "eta") if kw[n] is not None}
    out.update({f"X{i}_init": w for i, w in enumerate(kw["state"].weights)})
    if kw["state"].momentum is not None:
        out.update({f"S{i}_init": s for i, s in enumerate(kw["state"].momentum)})
    return out


def _results(y: torch.Tensor, xs: list[torch.Tensor], kw: dict) -> dict[str, torch.Tensor]:
    """y, the final accumulators and the gradients of a fixed random linear function of both."""
    g = torch.Generator().manual_seed(123)
    res = {"y": y, **{f"X{i}": x for i, x in enumerate(xs)}}
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in res.values())
    leaves = _leaves(kw)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {**res, **{f"d{n}": gr for n, gr in zip(leaves, grads)}}


def _op(impl: Callable, kw: dict, mem: tuple, chunk: int) -> dict[str, torch.Tensor]:
    bias, retention, _, norm, _ = mem
    rule = MemoryRule(attn_bias=bias, retention=retention, norm=norm)
    y, st = impl(chunk_size=chunk, rule=rule, **kw)
    return _results(y, list(st.weights), kw)


def _compare(expect: dict, got: dict) -> None:
    assert expect.keys() == got.keys()
    for name in expect:
        assert_close(name, expect[name], got[name], TOL)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("memory", ["moneta-d1", "moneta-d2", "memora"])
def test_chunk1_is_the_papers_per_token_rule(memory: str, impl: str) -> None:
    """Chunk size 1: every token is a chunk, so token t retrieves with f(X_t), the memory
    normalised after its own write (W_t = A_t / ||A_t||_q^(q-2), c softmax(Λ_t)), not with the
    factor taken before it. Outputs, final state and every gradient; B 2, H 2, L 21."""
    mem = MEMORIES[memory]
    kw = _inputs(mem, 21)
    expect = _results(*_paper_rule(kw, mem), kw)
    _compare(expect, _op(IMPLS[impl], kw, mem, 1))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("memory", list(MEMORIES))
@pytest.mark.parametrize("length", [23, 24], ids=["L23", "L24"])
def test_chunk_end_reads_the_exact_map(memory: str, impl: str, length: int) -> None:
    """Chunk 4: the last token of each chunk reads the exact f(X_t); the others (and all of the
    partial chunk 23 leaves) the chunk-start factor / the softmax's expansion."""
    mem = MEMORIES[memory]
    kw = _inputs(mem, length, seed=1)
    expect = _results(*_chunked_rule(kw, mem, 4), kw)
    _compare(expect, _op(IMPLS[impl], kw, mem, 4))


@pytest.mark.parametrize("memory", ["moneta-d2", "memora"])
def test_chunk_end_reads_the_returned_state_and_prefixes_agree(memory: str) -> None:
    """When chunks divide L the last token reads the returned state's exact map, y_{L-1} =
    retrieve(state, q_{L-1}); and a call on a prefix that ends inside a chunk gives the whole
    call's outputs (the models' piece contract): the end of a call is no boundary for reads."""
    bias, retention, _, norm, _ = mem = MEMORIES[memory]
    rule = MemoryRule(attn_bias=bias, retention=retention, norm=norm)
    kw = _inputs(mem, 24, seed=2)
    with torch.no_grad():
        y, st = memory_chunked(chunk_size=8, rule=rule, **kw)
        y_end = retrieve(st, kw["q"][:, :, -1:], rule)
        assert_close("y_last", y_end, y[:, :, -1:], TOL)
        for cut in (13, 16):
            part = {n: (t[:, :, :cut] if torch.is_tensor(t) else t) for n, t in kw.items()}
            y_part, _ = memory_chunked(chunk_size=8, rule=rule, **part)
            assert_close(f"prefix {cut}", y[:, :, :cut], y_part, TOL)


@pytest.mark.parametrize("memory", ["moneta-d2", "memora"])
def test_retrieval_is_causal(memory: str) -> None:
    """y_t has zero gradient w.r.t. every input of a later token, for a token inside a chunk, a
    chunk's last token and the sequence's last (reading with a chunk-end factor would fail)."""
    bias, retention, _, norm, _ = mem = MEMORIES[memory]
    rule = MemoryRule(attn_bias=bias, retention=retention, norm=norm)
    kw = _inputs(mem, 23, seed=3)
    y, _ = memory_chunked(chunk_size=4, rule=rule, **kw)
    names = ("q", "k", "v", "theta", "alpha")
    weight = torch.randn(
        y[:, :, 0].shape, generator=torch.Generator().manual_seed(4), dtype=y.dtype
    )
    for t in (1, 3, 9, 22):
        # a random weighting, not a plain sum: the LN's output sums to zero over features
        out = (y[:, :, t] * weight).sum()
        grads = torch.autograd.grad(out, [kw[n] for n in names], retain_graph=True)
        for name, gr in zip(names, grads):
            assert torch.all(gr[:, :, t + 1 :] == 0), f"y_{t} depends on later {name}"
            assert gr[:, :, : t + 1].abs().sum() > 0, f"y_{t} ignores {name}"
