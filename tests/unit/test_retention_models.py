"""RetNet, Landmark, LightNet and Aaren LMs: decode == train form, mode switches, references.

Tolerances are relative RMS in fp32: 1e-4 where only the order of the same math changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from models.ops.landmark import landmark_mask
from models.sequence import aaren, landmark, lightnet, retnet
from models.sequence.landmark import insert_landmarks
from models.sequence.lightnet import (
    additive_attention_chunked,
    additive_attention_reference,
    additive_attention_step,
    lrpe_angles,
)
from tests._testing import (
    assert_close,
    one_thread,  # noqa: F401  (autouse: this module runs on 1 thread)
    rel_rms,
)

TOL = 1e-4
FAMILIES = ("retnet", "landmark", "lightnet", "aaren")
ROOT = Path(__file__).resolve().parents[2]


def _tokens(L: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 258, (batch, L), generator=torch.Generator().manual_seed(seed))


def _build(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build(name, **overrides).eval()


def _decode(model, x: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """Logits of a `prefix`-token prefill followed by one-token steps with the carried state."""
    state, parts = None, []
    if prefix:
        out = model(x[:, :prefix])
        state, parts = out.state, [out.logits]
    for t in range(prefix, x.shape[1]):
        out = model(x[:, t : t + 1], state=state)
        state = out.state
        parts.append(out.logits)
    return torch.cat(parts, dim=1)


# ---- every family -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_token_by_token_decode_equals_training_forward(family):
    model = _build(f"{family}-tiny")
    x = _tokens(37)
    assert_close(f"{family} decode", model(x).logits, _decode(model, x, prefix=5), TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_finite_and_reach_every_parameter(family):
    model = _build(f"{family}-tiny").train()
    x = _tokens(45)
    out = model(x)
    assert out.state is None, "training forward should not build a cache"
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{family}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{family}: non-finite gradient in {name}"
    assert model.flops_per_token(2048) > 6 * sum(p.numel() for p in model.layers.parameters())


PAPER_SIZES = {
    name: mod.NOMINAL_PARAMS[name]
    for mod in (retnet, landmark, lightnet, aaren)
    for name in mod.NOMINAL_PARAMS
}


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_sizes_within_two_percent(name):
    with torch.device("meta"):
        m = models.build(name)
    n = sum(p.numel() for p in m.parameters())
    nominal = PAPER_SIZES[name]
    assert abs(n - nominal) / nominal < 0.02, f"{name}: {n / 1e6:.1f}M vs {nominal / 1e6:.1f}M"


# ---- RetNet -----------------------------------------------------------------------------------
@torch.no_grad()
def test_retnet_modes_agree():
    x = _tokens(45)
    ref = _build("retnet-tiny", mode="parallel")(x).logits
    for mode, chunk in (("chunked", 16), ("chunked", 7), ("auto", 16)):
        out = _build("retnet-tiny", mode=mode, chunk_size=chunk)(x).logits
        assert_close(f"retnet {mode}/{chunk} vs parallel", ref, out, TOL)
    assert_close("retnet recurrent vs parallel", ref, _decode(_build("retnet-tiny"), x), TOL)


def _torchscale_msr_parallel(msr: retnet.MultiScaleRetention, x: torch.Tensor) -> torch.Tensor:
    """torchscale 0.3.0's MultiScaleRetention.parallel_forward (+ RetNetRelPos), written out
    from its formulas with our layer's weights: angles 1 / 10000 ** linspace(0, 1, K/2) repeated
    pairwise, theta_shift, k * K^-1/2, D / sqrt(row sum), scores / max(|row sum|, 1), RMS head
    norm (eps 1e-6, no affine), swish gate, out_proj."""
    b, L, _ = x.shape
    H, K, V = msr.n_heads, msr.key_dim, msr.value_dim
    angle = 1.0 / (10000 ** torch.linspace(0, 1, K // 2))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()
    index = torch.arange(L).float()
    sin, cos = (f(index[:, None] * angle[None, :]) for f in (torch.sin, torch.cos))
    log_decay = torch.log(1 - 2 ** (-5 - torch.arange(H, dtype=torch.float)))
    rel = index[:, None] - index[None, :]
    mask = torch.exp(rel.masked_fill(rel < 0, float("inf")) * log_decay[:, None, None])
    mask = torch.nan_to_num(mask)
    mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()

    def shift(t):  # theta_shift with rotate_every_two
        rot = torch.stack((-t[..., 1::2], t[..., ::2]), dim=-1).flatten(-2)
        return t * cos + rot * sin

    q = msr.wq(x).view(b, L, H, K).transpose(1, 2)
    k = (msr.wk(x) * K**-0.5).view(b, L, H, K).transpose(1, 2)
    v = msr.wv(x).view(b, L, H, V).transpose(1, 2)
    qk = (shift(q) @ shift(k).transpose(-1, -2)) * mask
    qk = qk / qk.sum(dim=-1, keepdim=True).abs().clamp(min=1)
    o = (qk @ v).transpose(1, 2)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    return msr.wo(torch.nn.functional.silu(msr.wg(x)) * o.reshape(b, L, H * V))


@pytest.mark.parametrize("dim, heads", [(64, 4), (128, 2)], ids=["K16", "K64"])
@pytest.mark.parametrize("mode", ["parallel", "chunked"])
@torch.no_grad()
def test_retnet_retention_layer_matches_torchscale(dim, heads, mode):
    """Same weights, same input: our MSR layer equals torchscale's (defaults: rotary schedule,
    RMS head norm). The Llama schedule gives O(1) differences, so this pins the schedule."""
    torch.manual_seed(0)
    model = models.build("retnet-tiny", dim=dim, n_heads=heads, mode=mode, chunk_size=8).eval()
    msr = model.layers[0].msr
    x = torch.randn(2, 37, dim, generator=torch.Generator().manual_seed(1))
    ours, _ = msr(x, 0, None)
    assert_close(
        f"retnet MSR K={dim // heads} {mode} vs torchscale",
        _torchscale_msr_parallel(msr, x),
        ours,
        1e-5,
    )
    llama = models.build("retnet-tiny", dim=dim, n_heads=heads, rope_schedule="llama").eval()
    llama.load_state_dict(model.state_dict())
    assert rel_rms(ours, llama.layers[0].msr(x, 0, None)[0]) > 1e-2


# The interpreter must be on before `triton` is first imported (its standard library is jitted
# at import), and torch._dynamo imports triton as a side effect, e.g. after any meta-device build
# earlier in the session. A fresh interpreter with TRITON_INTERPRET=1 set avoids that order trap.
_TRITON_SCRIPT = """
import torch, models
from tests._testing import rel_rms
torch.set_num_threads(1)
x = torch.randint(0, 258, (1, 24), generator=torch.Generator().manual_seed(0))
out = {}
for mode in ("chunked", "triton"):
    torch.manual_seed(0)
    out[mode] = models.build("retnet-tiny", mode=mode, n_layers=1).eval()(x)
print(rel_rms(out["chunked"].logits, out["triton"].logits))
print(rel_rms(out["chunked"].state.states[0], out["triton"].state.states[0]))
"""


def test_retnet_triton_mode_matches_chunked():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    err_logits, err_state = (float(v) for v in run.stdout.split())
    assert err_logits < TOL and err_state < TOL, (err_logits, err_state)


@pytest.mark.parametrize(
    "overrides",
    [
        {"pos_emb": "xpos"},
        {"head_norm": "group"},
        {"normalize_decay": False, "normalize_scores": False},
    ],
)
@torch.no_grad()
def test_retnet_variants_stream_exactly(overrides):
    model = _build("retnet-tiny", **overrides)
    x = _tokens(40)
    whole = model(x).logits
    first = model(x[:, :11])
    rest = model(x[:, 11:], state=first.state)
    assert_close(
        f"retnet {overrides} pieces", whole, torch.cat([first.logits, rest.logits], 1), TOL
    )
    assert_close(f"retnet {overrides} decode", whole, _decode(model, x, prefix=3), TOL)


def test_retnet_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mode='recurrent'"):
        models.build("retnet-tiny", mode="recurrent")
    with pytest.raises(ValueError, match="pos_emb"):
        models.build("retnet-tiny", pos_emb="alibi")
    with pytest.raises(ValueError, match="rope_schedule='yarn'"):
        models.build("retnet-tiny", rope_schedule="yarn")


# ---- Landmark ---------------------------------------------------------------------------------
def test_landmark_insertion_layout_matches_the_op():
    f, lm_id = 4, 999
    x = torch.arange(11)[None]
    ids, idx = insert_landmarks(x, 0, f, lm_id)
    assert torch.equal(ids == lm_id, landmark_mask(ids.shape[1], f)[None])
    assert torch.equal(ids[0, idx], x[0])
    # continuing a block of which 3 tokens were already seen: the landmark comes after 1 token
    ids, idx = insert_landmarks(torch.tensor([[7, 8]]), 3, f, lm_id)
    assert ids.tolist() == [[7, lm_id, 8]] and idx.tolist() == [0, 2]


@pytest.mark.parametrize("positions", ["compressed", "absolute"])
@torch.no_grad()
def test_landmark_topk_all_streaming_is_exact(positions):
    """top-k >= #blocks: pieces (any lengths) and decoding equal the whole forward."""
    x = _tokens(75)
    for topk in (None, 1000):
        model = _build("landmark-tiny", cache_topk=topk, cache_positions=positions)
        whole = model(x).logits
        state, parts = None, []
        for a, b in ((0, 13), (13, 14), (14, 60), (60, 75)):
            out = model(x[:, a:b], state=state)
            state, parts = out.state, parts + [out.logits]
        assert_close(f"landmark {positions} top-{topk} pieces", whole, torch.cat(parts, 1), TOL)
        assert len(state.caches[0].k_marks[0, 0]) == 75 // model.cfg.mem_freq
    assert_close("landmark decode", whole, _decode(model, x, prefix=9), TOL)


@torch.no_grad()
def test_landmark_topk_below_all_is_approximate_but_close():
    """Fewer blocks than exist: differs from the whole forward; closer as k grows, and close
    when attention is peaked (the regime trained landmarks reach; sharpened here by scaling W_q).
    Absolute positions isolate the retrieval error from the compressed re-positioning."""
    x = _tokens(128)
    model = _build("landmark-tiny", cache_positions="absolute")
    for layer in model.layers:
        layer.attn.wq.weight.mul_(8.0)
    whole = model(x).logits
    errs = {}
    for k in (1, 2, 4, 8, 16):
        model.cfg.cache_topk = k
        first = model(x[:, :16])
        errs[k] = rel_rms(whole, torch.cat([first.logits, model(x[:, 16:], first.state).logits], 1))
    assert errs[1] > 1e-2, f"top-1 should differ from full attention: {errs}"
    assert errs[1] > errs[2] > errs[4] > errs[8] > errs[16], errs
    assert errs[4] < 0.1, f"top-4 of 15 blocks should stay close: {errs}"
    assert errs[16] < TOL, errs  # 15 complete blocks: top-16 is all of them


@pytest.mark.parametrize("selection", ["per_token_and_head", "max_over_heads"])
@torch.no_grad()
def test_landmark_compressed_retrieval_runs_and_differs(selection):
    x = _tokens(64)
    model = _build("landmark-tiny", cache_topk=2, cache_selection=selection)
    whole = model(x).logits
    streamed = _decode(model, x, prefix=8)
    assert torch.isfinite(streamed).all()
    assert_close("first block (nothing to retrieve yet)", whole[:, :8], streamed[:, :8], TOL)
    assert rel_rms(whole, streamed) > 1e-3


def test_landmark_cached_path_has_gradients():
    model = _build("landmark-tiny", cache_topk=2).train()
    x = _tokens(40)
    first = model(x[:, :20], state=None)
    assert first.state is None
    with torch.no_grad():
        state = model.eval()(x[:, :20]).state
    model.train()
    out = model(x[:, 20:], state=state)
    out.logits.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---- LightNet ---------------------------------------------------------------------------------
def _additive_inputs(L, K=6, V=5, key_scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, L, K, generator=g)
    k = torch.randn(2, 3, L, K, generator=g) * key_scale
    v = torch.randn(2, 3, L, V, generator=g)
    return q, k, v, lrpe_angles(torch.arange(L)[:, None], K)


@pytest.mark.parametrize("L", [1, 63, 100])
@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_lightnet_chunked_matches_naive_reference(L, chunk):
    q, k, v, ang = _additive_inputs(L)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    o, _ = additive_attention_chunked(*leaves, ang, chunk_size=chunk)
    ref = additive_attention_reference(*ref_leaves, ang)
    assert_close("lightnet o", ref, o, 1e-5)
    do = torch.randn_like(ref)
    (o.double() * do).sum().backward()
    (ref * do).sum().backward()
    for name, a, b in zip("qkv", ref_leaves, leaves):
        assert_close(f"lightnet d{name}", a.grad, b.grad, 1e-4)


def test_lightnet_no_overflow_on_huge_keys():
    q, k, v, ang = _additive_inputs(50, key_scale=1e4)  # exp(k) alone would overflow fp32
    k = k.requires_grad_()
    o, state = additive_attention_chunked(q, k, v, ang, chunk_size=16)
    o.sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(k.grad).all()
    assert torch.isfinite(state.S).all() and torch.isfinite(state.z).all()
    assert_close("huge keys vs fp64 reference", additive_attention_reference(q, k, v, ang), o, 1e-4)


def test_lightnet_state_continues_in_pieces_and_steps():
    q, k, v, ang = _additive_inputs(41)
    ref = additive_attention_reference(q, k, v, ang)
    o1, st = additive_attention_chunked(q[:, :, :17], k[:, :, :17], v[:, :, :17], ang[:17], None, 8)
    o2, st = additive_attention_chunked(
        q[:, :, 17:30], k[:, :, 17:30], v[:, :, 17:30], ang[17:30], st, 8
    )
    parts = [o1, o2]
    for t in range(30, 41):
        sl = slice(t, t + 1)
        o, st = additive_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], ang[sl], st)
        parts.append(o)
    assert_close("lightnet pieces + steps", ref, torch.cat(parts, 2), 1e-5)


def test_lrpe_is_relative_along_each_axis():
    """q~(p) . k~(p') depends on p - p' only, for 2D positions too (MD-LRPE)."""
    K = 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(K, generator=g), torch.randn(K, generator=g)
    pos = torch.tensor([[3, 5], [1, 2], [13, 25], [11, 22]])  # pairs 0-1 and 2-3: same offset
    ang = lrpe_angles(pos, K)
    feat = lambda x, a: torch.cat([x * a.cos(), x * a.sin()])
    s1 = feat(q, ang[0]) @ feat(k, ang[1])
    s2 = feat(q, ang[2]) @ feat(k, ang[3])
    assert torch.allclose(s1, s2, atol=1e-5)
    assert not torch.allclose(s1, feat(q, ang[0]) @ feat(k, ang[3]), atol=1e-3)
    assert lrpe_angles(torch.arange(5)[:, None], K).shape == (5, K)


# ---- Aaren ------------------------------------------------------------------------------------
@torch.no_grad()
def test_aaren_module_is_softmax_attention_of_a_learned_query():
    model = _build("aaren-tiny")
    mod = model.layers[0].mix
    x = torch.randn(2, 19, model.cfg.dim)
    out, state = mod(x, None)
    H, D = mod.n_heads, mod.head_dim
    k = mod.wk(x).view(2, 19, H, D).transpose(1, 2)
    v = mod.wv(x).view(2, 19, H, D).transpose(1, 2)
    s = torch.einsum("bhld,hd->bhl", k, mod.query) / D**0.5
    causal = torch.ones(19, 19, dtype=torch.bool).tril()
    p = torch.softmax(s[:, :, None, :].masked_fill(~causal, float("-inf")), dim=-1)
    ref = mod.wo((p @ v).transpose(1, 2).reshape(2, 19, -1))
    assert_close("aaren module", ref, out, 1e-5)
    assert state.w.shape == (2, H, D) and state.m.shape == (2, H)
