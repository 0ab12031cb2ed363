"""NeuralMemory layer invariances (fla's model tests): pieces + carried state == whole,
causality, retrieval consistency, chunked == reference through the whole layer."""

from __future__ import annotations

import pytest
import torch

from models.layers.neural_memory import NeuralMemory
from models.ops.memory import retrieve as memory_retrieve
from tests._testing import (
    assert_close,
    autograd_graph_size,
    one_thread,  # noqa: F401  (autouse: this module runs on 1 thread)
)

DIM, HEADS, CHUNK = 32, 2, 16
VARIANTS = {
    "titans": {},
    "titans-linear-nomom": {"depth": 1, "momentum": False},
    "moneta": {"attn_bias": "lp", "retention": "lq", "momentum": False},
    "yaad": {"attn_bias": "huber", "momentum": False},
    "memora": {"retention": "kl", "depth": 1, "momentum": False},
    # Miras' channel-wise gates from a low-rank projection (the presets' gate_rank)
    "moneta-cw": {"attn_bias": "lp", "retention": "lq", "momentum": False, "gate_rank": 8},
    "yaad-cw": {"attn_bias": "huber", "momentum": False, "gate_rank": 8},
    "memora-cw": {"retention": "kl", "depth": 1, "momentum": False, "gate_rank": 8},
}


def _layer(seed: int = 0, **kw) -> NeuralMemory:
    torch.manual_seed(seed)
    return NeuralMemory(DIM, HEADS, CHUNK, expansion=2, **kw)


def _x(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pieces_equal_whole(variant: str) -> None:
    mem = _layer(**VARIANTS[variant])
    x = _x(96)
    with torch.no_grad():
        y, st = mem(x)
        ys, piece_state = [], None
        for a, b in [(0, 32), (32, 80), (80, 96)]:  # multiples of CHUNK
            yp, piece_state = mem(x[:, a:b], piece_state)
            ys.append(yp)
    assert_close("y", y, torch.cat(ys, dim=1), 1e-5)
    assert_close("conv", st.conv, piece_state.conv, 0.0)
    for a, b in zip(st.memory.weights, piece_state.memory.weights):
        assert_close("memory", a, b, 1e-5)


@pytest.mark.parametrize("variant", ["titans", "yaad"])
def test_cpu_pieces_match_one_call(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """forward's own CPU pieces (CPU_PIECE_TOKENS) == one call: outputs, state, gradients.
    Batch 2 x 48 tokens per piece = 3 chunks; 100 tokens = pieces 48, 48, 4 (partial chunk)."""
    x = _x(100)
    res = []
    for piece_tokens in (10**9, 2 * 48):
        monkeypatch.setattr(NeuralMemory, "CPU_PIECE_TOKENS", piece_tokens)
        mem = _layer(**VARIANTS[variant])
        y, st = mem(x)
        (y.square().mean() + sum(w.square().sum() for w in st.memory.weights)).backward()
        res.append((y, st, {n: p.grad for n, p in mem.named_parameters()}))
    (y1, st1, g1), (y2, st2, g2) = res
    assert_close("y", y1, y2, 1e-5)
    assert_close("conv", st1.conv, st2.conv, 0.0)
    for a, b in zip(st1.memory.weights, st2.memory.weights):
        assert_close("memory", a, b, 1e-5)
    for name, g in g1.items():
        assert_close(f"grad {name}", g, g2[name], 1e-4)


@pytest.mark.parametrize("variant", ["titans", "yaad-cw"])
def test_recompute_every_is_the_plain_layer_keeping_less(variant: str) -> None:
    """recompute_every=32 (TitansConfig.mem_recompute_every): training runs 32-token pieces,
    each recomputed in backward. Same y, state and parameter gradients as the plain layer
    (chunk-aligned pieces with the state carried == whole), and the forward keeps a graph of a
    few nodes rather than the whole layer's; in eval or under no_grad it is the plain layer."""
    x = _x(100)
    res = []
    for n in (0, 32):
        mem = _layer(recompute_every=n, **VARIANTS[variant]).train()
        y, st = mem(x)
        nodes = autograd_graph_size(y)
        (y.square().mean() + sum(w.square().sum() for w in st.memory.weights)).backward()
        res.append((y, st, nodes, {name: p.grad for name, p in mem.named_parameters()}))
        with torch.no_grad():
            assert torch.equal(mem(x)[0], mem.eval()(x)[0])
    (y0, st0, nodes0, g0), (y1, st1, nodes1, g1) = res
    assert_close("y", y0, y1, 1e-5)
    assert_close("conv", st0.conv, st1.conv, 0.0)
    assert not st1.aligned and st0.aligned == st1.aligned
    for a, b in zip(st0.memory.weights, st1.memory.weights):
        assert_close("memory", a, b, 1e-5)
    for name, g in g0.items():
        assert_close(f"grad {name}", g, g1[name], 1e-4)
    assert 5 * nodes1 < nodes0, (nodes0, nodes1)  # measured 15 against 214


@pytest.mark.parametrize("variant", ["titans", "yaad"])
def test_causal(variant: str) -> None:
    """Changing tokens after t (mid-chunk) never changes y at <= t."""
    mem = _layer(**VARIANTS[variant])
    x, t = _x(50), 37
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, 50 - t - 1, DIM)
    with torch.no_grad():
        y, _ = mem(x)
        y2, _ = mem(x2)
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
    assert (y[:, t + 1 :] - y2[:, t + 1 :]).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", [1, 4])
def test_conv_input_and_cache(kernel: int) -> None:
    """The conv's input is [cache | u] and the next cache its last K-1 inputs (a copy), and
    the layer's conv == F.conv1d over them: streaming with the cache is the whole sequence."""
    mem = _layer(conv_kernel=kernel)
    gen = torch.Generator().manual_seed(3)
    chans = mem.conv_weight.shape[0]
    u = torch.randn(2, 37, chans, generator=gen)
    cache = torch.randn(2, chans, kernel - 1, generator=gen)
    full, nxt = mem._conv_input(u, cache)
    assert_close("conv input", torch.cat([cache, u.mT], dim=-1).mT, full, 0.0)
    assert nxt.shape == cache.shape and nxt.data_ptr() != full.data_ptr()
    if kernel > 1:
        assert_close("next cache", u[:, -(kernel - 1) :].mT, nxt, 0.0)


def test_backward_reaches_every_parameter() -> None:
    mem = _layer()
    y, st = mem(_x(40))
    (y.square().mean() + sum(w.square().mean() for w in st.memory.weights)).backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["titans", "memora", "moneta-cw", "yaad-cw", "memora-cw"])
def test_layer_chunked_matches_reference(variant: str) -> None:
    """The same layer with impl='reference' (token loop): outputs and parameter gradients."""
    x = _x(40)
    res = []
    for impl in ("reference", "chunked"):
        mem = _layer(impl=impl, **VARIANTS[variant])
        y, _ = mem(x)
        y.square().mean().backward()
        res.append((y, {n: p.grad for n, p in mem.named_parameters()}))
    assert_close("y", res[0][0], res[1][0], 1e-5)
    for name, g in res[0][1].items():
        assert_close(f"grad {name}", g, res[1][1][name], 1e-4)


def test_retrieve_matches_forward_without_writes() -> None:
    """With theta ~ 0, alpha ~ 0 the write is a no-op, so forward == retrieve at the start."""
    mem = _layer(momentum=False)
    with torch.no_grad():
        mem.gates.weight.zero_()
        mem.gates.bias.view(3, HEADS)[0].fill_(-40.0)  # theta = max_lr * sigmoid(-40)
        mem.gates.bias.view(3, HEADS)[2].fill_(-40.0)  # alpha
        x = _x(40)
        y, st = mem(x)
        assert_close("retrieve(x)", y, mem.retrieve(x), 1e-6)
        q = torch.nn.functional.normalize(torch.randn(2, HEADS, 5, DIM // HEADS), dim=-1)
        assert_close("retrieve(q)", memory_retrieve(st.memory, q, mem.rule), mem.retrieve(q, st), 0)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="depth 1"):
        NeuralMemory(DIM, HEADS, CHUNK, depth=2, retention="kl")
    with pytest.raises(ValueError, match="divisible"):
        NeuralMemory(30, 4, CHUNK)
    with pytest.raises(ValueError, match="attn_bias"):
        NeuralMemory(DIM, HEADS, CHUNK, attn_bias="cosine")
    with pytest.raises(ValueError, match="multiple of chunk_size=16"):
        NeuralMemory(DIM, HEADS, CHUNK, recompute_every=24)


@pytest.mark.parametrize("variant", ["moneta-cw", "yaad-cw", "memora-cw"])
def test_low_rank_gates_are_channel_wise(variant: str) -> None:
    """gate_rank=r: x -> Linear(dim, r) -> Linear(r, 2 H D [+ H]) gives theta, alpha per head
    and key channel (B, H, L, D) and Huber's delta per head (B, H, L); the channels differ."""
    mem = _layer(**VARIANTS[variant])
    head_dim = DIM // HEADS
    huber = variant.startswith("yaad")
    assert mem.gate_down.weight.shape == (8, DIM)
    assert mem.gates.weight.shape == (2 * DIM + (HEADS if huber else 0), 8)
    theta, alpha, eta, delta = mem._gates(_x(40))
    assert theta.shape == alpha.shape == (2, HEADS, 40, head_dim) and eta is None
    assert (delta.shape == (2, HEADS, 40)) if huber else delta is None
    assert (0 < theta).all() and (theta < mem.max_lr).all() and (0 < alpha).all()
    assert theta.std(dim=-1).min() > 0 and alpha.std(dim=-1).min() > 0
    # initial gates as the per-head ones: theta ~ max_lr / 2, alpha small
    assert abs(theta.mean() / mem.max_lr - 0.5) < 0.05 and alpha.mean() < 0.03


def test_gate_rank_errors() -> None:
    with pytest.raises(ValueError, match="momentum=False"):
        NeuralMemory(DIM, HEADS, CHUNK, gate_rank=8)
    with pytest.raises(ValueError, match="gate_rank"):
        NeuralMemory(DIM, HEADS, CHUNK, gate_rank=-1, momentum=False)
