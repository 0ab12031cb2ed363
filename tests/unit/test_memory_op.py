"""Neural-memory op: chunked == token-by-token reference (outputs, final state, every gradient).

fla style (docs/ARCHITECTURE.md): fixed seeds, lengths that chunks do not divide, a chunk sweep,
per-tensor relative-RMS tolerances. Measured errors in fp32 are <= ~3e-6; TOL leaves ~3x room.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from models.ops.memory import (
    MemoryRule,
    MemoryState,
    memory_chunked,
    memory_reference,
    neural_memory,
    retrieve,
)
from tests._testing import (
    assert_close,
    one_thread,  # noqa: F401  (autouse: this module runs on 1 thread)
    rel_rms,
)

TOL = 1e-5  # relative RMS, every compared tensor, fp32 on both sides
B, H = 2, 3


def _inputs(
    length: int,
    d_in: int,
    d_out: int,
    depth: int,
    momentum: bool,
    rule: MemoryRule,
    seed: int = 0,
) -> tuple[dict, list[str]]:
    """Keyword inputs of the op plus the names of those that need a gradient."""
    g = torch.Generator().manual_seed(seed)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g)

    # Step sizes in the stable regime (measured): an MLP memory's gradient scales with its
    # hidden width and the l3 bias's gradient is cubic, so both take smaller steps.
    step = (0.5 if depth == 1 else 0.05) * (0.1 if rule.attn_bias == "lp" else 1.0)
    kw = {
        "q": F.normalize(r(B, H, length, d_in), dim=-1),
        "k": F.normalize(r(B, H, length, d_in), dim=-1),
        "v": r(B, H, length, d_out),
        "theta": step * torch.sigmoid(r(B, H, length)),
        # lq's W = A / ||A||_q^(q-2) grows as decay shrinks A (degree -1 for q = 4): mild decay.
        "alpha": torch.sigmoid(r(B, H, length) - 2.0) * (0.01 if rule.retention == "lq" else 1.0),
        "eta": torch.sigmoid(r(B, H, length)) if momentum else None,
        "huber_delta": None,
    }
    if rule.attn_bias == "huber":
        # Spread around the typical residual norm (~sqrt(d_out)) so both branches are taken.
        kw["huber_delta"] = d_out**0.5 * (0.5 + torch.rand(B, H, length, generator=g))
    if depth == 1:
        dims = [d_in, d_out]
    else:
        dims = [d_in] + [2 * d_in] * (depth - 1) + [d_out]
    ws = [r(H, a, b) / a**0.5 for a, b in zip(dims[:-1], dims[1:])]
    if rule.retention == "lq":
        ws = [3.0 * w for w in ws]  # larger A: writes change ||A||_q, hence W's scale, less
    if rule.retention == "kl":
        ws = [r(H, d_in, d_out)]  # log-weights
    moms = [0.01 * r(B, H, *w.shape[-2:]) for w in ws] if momentum else None
    optional = ("q", "k", "v", "theta", "alpha", "eta", "huber_delta")
    names = [n for n in optional if kw[n] is not None]
    for n in names:
        kw[n].requires_grad_()
    for t in ws + (moms or []):
        t.requires_grad_()
    kw["state"] = MemoryState(tuple(ws), None if moms is None else tuple(moms))
    return kw, names


def _run(fn, kw: dict, names: list[str], chunk: int, rule: MemoryRule) -> dict[str, torch.Tensor]:
    """Outputs, final state and gradients of a random linear function of all of them."""
    y, st = fn(chunk_size=chunk, rule=rule, **kw)
    g = torch.Generator().manual_seed(123)
    res = {"y": y}
    res.update({f"W{i}": w for i, w in enumerate(st.weights)})
    if st.momentum is not None:
        res.update({f"S{i}": s for i, s in enumerate(st.momentum)})
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in res.values())
    leaves = {n: kw[n] for n in names}
    leaves.update({f"W{i}_init": w for i, w in enumerate(kw["state"].weights)})
    if kw["state"].momentum is not None:
        leaves.update({f"S{i}_init": s for i, s in enumerate(kw["state"].momentum)})
    grads = torch.autograd.grad(loss, list(leaves.values()))
    res.update({f"d{n}": gr for n, gr in zip(leaves, grads)})
    return res


CASES = [
    # (length, chunk, d_in, d_out, depth, momentum, attn_bias, retention, residual)
    (63, 16, 16, 24, 1, True, "l2", "l2", True),  # Titans, linear memory
    (200, 64, 16, 24, 1, True, "l2", "l2", True),
    (63, 64, 24, 24, 2, True, "l2", "l2", True),  # one partial chunk
    (200, 16, 16, 16, 2, True, "l2", "l2", True),  # Titans MLP memory
    (200, 64, 16, 24, 2, False, "l2", "l2", False),  # no residual, Din != Dout
    (63, 16, 16, 24, 1, False, "lp", "l2", True),  # Moneta bias
    (200, 64, 16, 16, 2, False, "lp", "l2", True),
    (63, 16, 16, 16, 2, False, "huber", "l2", True),  # Yaad
    (200, 64, 16, 24, 1, False, "huber", "l2", True),
    (63, 16, 16, 24, 1, False, "lp", "lq", True),  # Moneta
    (200, 64, 16, 16, 2, False, "l2", "lq", True),
    (63, 16, 16, 16, 2, True, "l2", "lq", True),
    (63, 16, 16, 24, 1, False, "l2", "kl", True),  # Memora
    (200, 64, 16, 24, 1, False, "l2", "kl", True),
    (63, 16, 16, 16, 1, True, "huber", "kl", True),
    # more chunks than READ_GROUP (16): several batched reads, the partial chunk in the last
    (150, 8, 16, 16, 2, True, "l2", "l2", True),
    (150, 8, 16, 24, 1, False, "huber", "lq", True),
]


@pytest.mark.parametrize(
    "length,chunk,d_in,d_out,depth,momentum,bias,retention,residual",
    CASES,
    ids=[
        f"L{c[0]}-b{c[1]}-{c[2]}x{c[3]}-d{c[4]}-{'mom' if c[5] else 'nomom'}-{c[6]}-{c[7]}"
        + ("" if c[8] else "-nores")
        for c in CASES
    ],
)
def test_chunked_matches_reference(
    length: int,
    chunk: int,
    d_in: int,
    d_out: int,
    depth: int,
    momentum: bool,
    bias: str,
    retention: str,
    residual: bool,
) -> None:
    rule = MemoryRule(attn_bias=bias, retention=retention, residual=residual)
    kw, names = _inputs(length, d_in, d_out, depth, momentum, rule)
    ref = _run(memory_reference, kw, names, chunk, rule)
    out = _run(memory_chunked, kw, names, chunk, rule)
    assert ref.keys() == out.keys()
    for name in ref:
        assert_close(name, ref[name], out[name], TOL)


def test_huber_takes_both_branches() -> None:
    # Guards the Huber cases above against silently testing one branch only.
    rule = MemoryRule(attn_bias="huber")
    kw, _ = _inputs(63, 16, 24, 1, False, rule)
    w = kw["state"].weights[0].detach()
    r = kw["k"].detach() @ w - kw["v"]
    inside = r.norm(dim=-1) <= kw["huber_delta"]
    assert 0.1 < inside.float().mean() < 0.9


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_learns(depth: int) -> None:
    """Writing (k, v) pairs makes retrieval at those keys return their values more closely."""
    rule = MemoryRule()
    g = torch.Generator().manual_seed(7)
    d, n = 32, 8
    k = F.normalize(torch.randn(1, 1, n, d, generator=g), dim=-1)
    v = torch.randn(1, 1, n, d, generator=g)
    dims = [d, d] if depth == 1 else [d, 2 * d, d]
    ws = tuple(torch.randn(1, a, b, generator=g) / a**0.5 for a, b in zip(dims, dims[1:]))
    state0 = MemoryState(ws)
    # Six passes over the pairs, chunk 4, so later writes see the earlier ones; steps are the
    # stable ones for each depth (an MLP's gradient grows with its hidden width).
    reps, step = 6, (0.2 if depth == 1 else 0.05)
    ones = torch.ones(1, 1, n * reps)
    kk, vv = k.repeat(1, 1, reps, 1), v.repeat(1, 1, reps, 1)
    _, state1 = memory_chunked(kk, kk, vv, step * ones, 0 * ones, 0.5 * ones, state0, chunk_size=4)
    err0 = (retrieve(state0, k, rule) - v).norm()
    err1 = (retrieve(state1, k, rule) - v).norm()
    assert err1 < 0.3 * err0, (float(err0), float(err1))


def test_no_write_retrieves_initial_memory() -> None:
    """theta = alpha = 0 without momentum: y_t == retrieve(initial state, q_t)."""
    rule = MemoryRule()
    kw, _ = _inputs(40, 16, 16, 2, False, rule, seed=3)
    kw["theta"] = torch.zeros_like(kw["theta"])
    kw["alpha"] = torch.zeros_like(kw["alpha"])
    y, st = memory_chunked(chunk_size=16, rule=rule, **kw)
    assert_close("y", retrieve(kw["state"], kw["q"], rule), y, 1e-6)
    for w0, w1 in zip(kw["state"].weights, st.weights):
        assert_close("W", w0.expand_as(w1), w1, 1e-7)


@pytest.mark.parametrize("retention", ["l2", "lq", "kl"])
def test_state_carry_equals_whole(retention: str) -> None:
    """Two calls with the carried state == one call (split at a chunk boundary)."""
    rule = MemoryRule(retention=retention)
    depth = 1 if retention == "kl" else 2
    kw, _ = _inputs(100, 16, 16, depth, True, rule, seed=5)
    kw = {n: (t.detach() if torch.is_tensor(t) else t) for n, t in kw.items()}
    y, st = memory_chunked(chunk_size=16, rule=rule, **kw)
    split = 48
    first = {n: (t[:, :, :split] if torch.is_tensor(t) else t) for n, t in kw.items()}
    second = {n: (t[:, :, split:] if torch.is_tensor(t) else t) for n, t in kw.items()}
    y1, st1 = memory_chunked(chunk_size=16, rule=rule, **first)
    y2, st2 = memory_chunked(chunk_size=16, rule=rule, **{**second, "state": st1})
    assert_close("y", y, torch.cat([y1, y2], dim=2), 1e-6)
    for a, b in zip(st.weights + st.momentum, st2.weights + st2.momentum):
        assert_close("state", a, b, 1e-6)


@pytest.mark.parametrize("retention", ["l2", "kl"])
def test_checkpoint_same_values_and_gradients(retention: str) -> None:
    """checkpoint=True (grouped recompute in backward) changes memory use, not results."""
    rule = MemoryRule(retention=retention)
    kw, names = _inputs(150, 16, 16, 1 if retention == "kl" else 2, True, rule, seed=11)
    plain = _run(memory_chunked, kw, names, 16, rule)
    ckpt = _run(partial(memory_chunked, checkpoint=True), kw, names, 16, rule)
    for name in plain:
        assert_close(name, plain[name], ckpt[name], 1e-6)


def test_dispatch_and_errors() -> None:
    rule = MemoryRule()
    kw, _ = _inputs(20, 8, 8, 1, False, rule)
    kw = {n: (t.detach() if torch.is_tensor(t) else t) for n, t in kw.items()}
    y_ref, _ = neural_memory(chunk_size=8, impl="reference", **kw)
    y_chk, _ = neural_memory(chunk_size=8, **kw)
    assert rel_rms(y_ref, y_chk) < TOL
    with pytest.raises(ValueError, match="impl"):
        neural_memory(chunk_size=8, impl="no-such-impl", **kw)
    with pytest.raises(ValueError, match="attn_bias"):
        MemoryRule(attn_bias="l1")
    with pytest.raises(ValueError, match="retention"):
        MemoryRule(retention="l3")
    with pytest.raises(ValueError, match="huber_delta"):
        memory_chunked(chunk_size=8, rule=MemoryRule(attn_bias="huber"), **kw)
    kl2 = {**kw, "state": MemoryState((torch.zeros(H, 8, 16), torch.zeros(H, 16, 8)))}
    with pytest.raises(ValueError, match="depth 1"):
        memory_chunked(chunk_size=8, rule=MemoryRule(retention="kl"), **kl2)


@pytest.mark.parametrize(("depth", "m"), [(1, 1), (1, 2), (2, 1), (2, 2), (3, 2)])
def test_titans_write_backward_gradcheck(depth: int, m: int) -> None:
    """The hand-written backward of one Titans write (`_WriteL2`) against finite differences in
    float64: gradients w.r.t. keys, rv, the carry matrix, the per-token weights and every state,
    through all outputs (hidden zs, deltas, new states). Layers wider than they are tall are
    stored transposed (`_transposed`), so depth >= 2 covers both layouts. The gradients autograd
    hands in must come back unmodified (the Function adds into its own buffers only)."""
    from models.ops.memory.chunked_autograd import _WriteL2
    from models.ops.memory.chunked_state import _transposed

    gen = torch.Generator().manual_seed(depth * 10 + m)
    g, t, d, hidden = 2, 5, 3, 4
    dims = [d] + [hidden] * (depth - 1) + [d]
    shapes = list(zip(dims[:-1], dims[1:]))
    trs = tuple(_transposed([torch.empty(a, b) for a, b in shapes], m, MemoryRule()))

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    sts = [rnd(g, m * b, a) if tr else rnd(g, m * a, b) for (a, b), tr in zip(shapes, trs)]
    args = (rnd(g, t, d), rnd(g, t, d), rnd(g, m, m), rnd(g, t, m, 1), *sts)
    assert torch.autograd.gradcheck(lambda *xs: _WriteL2.apply(trs, m, *xs), args)

    outs = _WriteL2.apply(trs, m, *args)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    kept = [gr.clone() for gr in grads]
    torch.autograd.grad(outs, args, grads)
    for gr, k in zip(grads, kept):
        assert torch.equal(gr, k), "an incoming gradient was modified in place"


NORM_CASES = [
    # (length, chunk, d_in, d_out, depth, momentum, attn_bias, retention, residual)
    (63, 16, 16, 16, 2, True, "l2", "l2", True),  # Titans MLP memory, odd length
    (63, 64, 24, 24, 2, True, "l2", "l2", True),  # one partial chunk
    (200, 64, 16, 24, 2, False, "l2", "l2", False),  # no residual, Din != Dout
    (150, 8, 16, 16, 2, True, "l2", "l2", True),  # several batched reads
    (63, 16, 16, 16, 3, True, "l2", "l2", True),  # depth 3
    (63, 16, 16, 16, 2, False, "lp", "lq", True),  # Moneta
    (63, 16, 16, 16, 2, False, "huber", "l2", True),  # Yaad
]


@pytest.mark.parametrize(
    "length,chunk,d_in,d_out,depth,momentum,bias,retention,residual",
    NORM_CASES,
    ids=[f"L{c[0]}-b{c[1]}-d{c[4]}-{c[6]}-{c[7]}" + ("" if c[8] else "-nores") for c in NORM_CASES],
)
def test_chunked_matches_reference_with_norm(
    length: int,
    chunk: int,
    d_in: int,
    d_out: int,
    depth: int,
    momentum: bool,
    bias: str,
    retention: str,
    residual: bool,
) -> None:
    """M(x) = [x +] LN(MLP(x)) (Miras' MLP memory): the chunked form, whose writes back-propagate
    through the LN and whose dual-form reads apply it per token, equals the token loop: outputs,
    final state and every gradient (batch 2, 3 heads, lengths chunks do not divide). In
    float64: the LN's 1/std amplifies fp32 rounding to ~2e-5 in some gradients, while the two
    forms agree to ~1e-10 in float64, which an error in the LN's backward would not."""
    rule = MemoryRule(attn_bias=bias, retention=retention, residual=residual, norm=True)
    kw, names = _inputs(length, d_in, d_out, depth, momentum, rule)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().requires_grad_()

    kw.update({n: leaf(kw[n]) for n in names})
    st = kw["state"]
    kw["state"] = MemoryState(*(None if ts is None else tuple(map(leaf, ts)) for ts in st))
    ref = _run(memory_reference, kw, names, chunk, rule)
    out = _run(memory_chunked, kw, names, chunk, rule)
    assert ref.keys() == out.keys()
    for name in ref:
        assert ref[name].dtype == torch.float64
        assert_close(name, ref[name], out[name], 1e-9)
    # the norm is in effect: the plain MLP memory answers differently
    plain = memory_chunked(chunk_size=chunk, rule=MemoryRule(bias, retention, residual), **kw)[0]
    assert rel_rms(ref["y"], plain) > 1e-2


def test_norm_is_a_layer_norm_of_the_mlp_answer() -> None:
    """retrieve() with norm=True is x + LN(MLP(x)) as torch's own layer_norm computes it."""
    kw, _ = _inputs(10, 16, 16, 2, True, MemoryRule())
    q, st = kw["q"].detach(), kw["state"]
    plain = retrieve(st, q, MemoryRule(residual=False))
    expect = q + F.layer_norm(plain, (plain.shape[-1],), eps=1e-5)
    assert_close("y", expect, retrieve(st, q, MemoryRule(norm=True)), 1e-6)
    with pytest.raises(ValueError, match="norm_eps"):
        MemoryRule(norm_eps=0.0)


@pytest.mark.parametrize("impl", [memory_reference, memory_chunked])
def test_dtype_rule(impl) -> None:
    """float64 computes in float64 (state float64); bf16 computes in float32 (y bf16, state
    float32). The two forms agree to float64 precision, so neither rounds through float32."""
    rule = MemoryRule(norm=True)
    kw, _ = _inputs(37, 8, 8, 2, True, rule, seed=4)
    kw = {n: (t.detach() if torch.is_tensor(t) else t) for n, t in kw.items()}
    st = kw.pop("state")
    as64 = {n: (t.double() if torch.is_tensor(t) else t) for n, t in kw.items()}
    st64 = MemoryState(*(tuple(w.double() for w in ws) for ws in st))
    y, out = impl(chunk_size=8, rule=rule, state=st64, **as64)
    assert y.dtype == torch.float64
    assert {w.dtype for w in out.weights + out.momentum} == {torch.float64}
    y_ref, st_ref = memory_reference(chunk_size=8, rule=rule, state=st64, **as64)
    assert rel_rms(y_ref, y) < 1e-12
    assert rel_rms(st_ref.weights[0], out.weights[0]) < 1e-12
    # a float32 state with float64 inputs is promoted, not the inputs demoted
    y_mixed, _ = impl(chunk_size=8, rule=rule, state=st, **as64)
    assert y_mixed.dtype == torch.float64
    assert rel_rms(y_ref, y_mixed) < 1e-6
    as16 = {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in kw.items()}
    y16, st16 = impl(chunk_size=8, rule=rule, state=st, **as16)
    assert y16.dtype == torch.bfloat16
    assert {w.dtype for w in st16.weights + st16.momentum} == {torch.float32}


def _channelwise(kw: dict, names: list[str], seed: int = 7) -> dict:
    """kw with theta / alpha made channel-wise (B, H, L, Din): each channel a random share (0-2x
    for theta, 0-1x for alpha, so alpha stays in (0, 1)) of the per-head gate, float64 leaves."""
    g = torch.Generator().manual_seed(seed)
    out = {n: (t.detach().double() if torch.is_tensor(t) else t) for n, t in kw.items()}
    shape = (*kw["k"].shape[:3], kw["k"].shape[-1])
    out["theta"] = out["theta"][..., None] * 2.0 * torch.rand(shape, generator=g).double()
    out["alpha"] = out["alpha"][..., None] * torch.rand(shape, generator=g).double()
    for n in names:
        out[n].requires_grad_()
    st = kw["state"]
    leaf = lambda t: t.detach().double().requires_grad_()
    out["state"] = MemoryState(*(None if ts is None else tuple(map(leaf, ts)) for ts in st))
    return out


CW_CASES = [
    # (length, chunk, d_in, d_out, depth, attn_bias, retention, norm)
    (63, 16, 16, 24, 1, "l2", "l2", False),  # linear memory, Din != Dout
    (61, 16, 16, 16, 2, "l2", "l2", False),  # MLP memory (the Titans rule's autograd write)
    (61, 16, 16, 16, 2, "lp", "lq", True),  # Moneta
    (40, 8, 16, 24, 1, "lp", "lq", False),
    (61, 16, 16, 16, 2, "huber", "l2", True),  # Yaad
    (63, 16, 16, 24, 1, "l2", "kl", False),  # Memora
    (150, 8, 16, 24, 1, "l2", "kl", False),  # more chunks than READ_GROUP, partial last one
    (150, 8, 16, 16, 2, "lp", "lq", True),
]


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize(
    "length,chunk,d_in,d_out,depth,bias,retention,norm",
    CW_CASES,
    ids=[f"L{c[0]}-b{c[1]}-{c[2]}x{c[3]}-d{c[4]}-{c[5]}-{c[6]}" for c in CW_CASES],
)
def test_channelwise_gates_chunked_matches_reference(
    length: int,
    chunk: int,
    d_in: int,
    d_out: int,
    depth: int,
    bias: str,
    retention: str,
    norm: bool,
    checkpoint: bool,
) -> None:
    """Channel-wise theta / alpha (B, H, L, Din; Miras): the chunked form's per-channel
    cumulative decays equal the token loop, outputs, final state and every gradient (the
    channel-wise gates' included), batch 2, 3 heads, lengths chunks do not divide. float64, so
    the tolerance (1e-9) catches any inexact factorisation (they agree to ~1e-12)."""
    rule = MemoryRule(attn_bias=bias, retention=retention, norm=norm)
    kw, names = _inputs(length, d_in, d_out, depth, False, rule)
    kw = _channelwise(kw, names)
    ref = _run(memory_reference, kw, names, chunk, rule)
    out = _run(partial(memory_chunked, checkpoint=checkpoint), kw, names, chunk, rule)
    assert ref.keys() == out.keys() and ref["dtheta"].shape == kw["theta"].shape
    for name in ref:
        assert_close(name, ref[name], out[name], 1e-9)


@pytest.mark.parametrize("retention", ["l2", "kl"])
def test_channelwise_gates_scale_the_key_channels(retention: str) -> None:
    """What "channel-wise" means, from the equations (linear memory, chunk 1, l2 bias):
    W_t = (1 - alpha_t) ⊙_rows W_{t-1} - theta_t ⊙_rows 2 k_t (k_t W_{t-1} - v_t)ᵀ, row r scaled
    by channel r of the key (kl: the same recurrence on Λ, W = softmax over rows); y_t = q_t W_t.
    Also: gates equal across channels give the per-head op exactly (depth 1 and 2)."""
    rule = MemoryRule(retention=retention)
    kw, names = _inputs(21, 8, 8, 1, False, rule)
    kw = _channelwise(kw, names)
    kw = {n: (t.detach() if torch.is_tensor(t) else t) for n, t in kw.items()}
    kw["state"] = kw["state"].detach()
    x = kw["state"].weights[0].expand(B, H, 8, 8)
    ys = []
    for t in range(21):
        w = torch.softmax(x, dim=-2) if retention == "kl" else x
        k_t, v_t, q_t = (kw[n][:, :, t : t + 1] for n in ("k", "v", "q"))
        grad = k_t.mT @ (2.0 * (k_t @ w - v_t))
        x = (1.0 - kw["alpha"][:, :, t, :, None]) * x - kw["theta"][:, :, t, :, None] * grad
        w = torch.softmax(x, dim=-2) if retention == "kl" else x
        ys.append(q_t @ w)
    for impl in (memory_reference, memory_chunked):
        y, st = impl(chunk_size=1, rule=rule, **kw)
        assert_close("y", torch.cat(ys, dim=2), y, 1e-12)
        assert_close("X", x, st.weights[0], 1e-12)
    for depth in (1, 2):
        kw, _ = _inputs(37, 8, 8, depth, False, MemoryRule())
        kw = {n: (t.detach() if torch.is_tensor(t) else t) for n, t in kw.items()}
        kw["state"] = kw["state"].detach()
        cw = {**kw, "theta": kw["theta"][..., None].expand(-1, -1, -1, 8)}
        cw["alpha"] = kw["alpha"][..., None].expand(-1, -1, -1, 8)
        for impl in (memory_reference, memory_chunked):
            assert_close("y", impl(chunk_size=8, **kw)[0], impl(chunk_size=8, **cw)[0], 1e-6)


def test_channelwise_gate_errors() -> None:
    kw, _ = _inputs(20, 8, 8, 1, True, MemoryRule())
    kw = {n: (t.detach() if torch.is_tensor(t) else t) for n, t in kw.items()}
    cw = {**kw, "theta": kw["theta"][..., None].expand(-1, -1, -1, 8)}
    cw["alpha"] = kw["alpha"][..., None].expand(-1, -1, -1, 8)
    for impl in (memory_reference, memory_chunked):
        with pytest.raises(ValueError, match="eta=None"):  # momentum: per-head gates only
            impl(chunk_size=8, **cw)
        with pytest.raises(ValueError, match="both"):  # one channel-wise, one per head
            impl(chunk_size=8, **{**cw, "eta": None, "alpha": kw["alpha"]})


@pytest.mark.parametrize("retention", ["lq", "kl"])
def test_retrieve_applies_the_map_in_the_compute_dtype(retention: str) -> None:
    """bf16 memory weights (FSDP's param_dtype) are cast to q's compute dtype before the lq norm
    / kl softmax, as the op's init_state does, so MAC's read matches the op's."""
    torch.manual_seed(0)
    w = torch.randn(2, 2, 8, 8).to(torch.bfloat16)
    q = torch.randn(2, 2, 5, 8)
    rule = MemoryRule(retention=retention)
    got = retrieve(MemoryState((w,), None), q, rule)
    want = retrieve(MemoryState((w.float(),), None), q, rule)
    assert torch.equal(got, want)
