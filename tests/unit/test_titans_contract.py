"""Titans / Miras models against the streaming, evaluation, dtype and stability contract.

Each test pins a defect an independent token-by-token review found: a misaligned piece's
state silently continued wrong; impl='reference' could not run under no_grad; float64 failed
in MAC; max_lr = 0.05 made MAC-tiny NaN within 96 tokens.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import models
from models.layers.neural_memory import NeuralMemory
from models.sequence.titans import MAX_LR_WITHOUT_NORM, Titans, TitansConfig
from tests._testing import (
    assert_close,
    one_thread,  # noqa: F401  (autouse: this module runs on 1 thread)
)

TINY = [
    n
    for n in models.list_models()
    if n.endswith("-tiny") and models.get_spec(n).family in ("titans", "miras")
]


def _tokens(length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 258, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_misaligned_piece_is_exact_but_cannot_be_continued(name: str) -> None:
    """A piece off the stream multiple: its own logits equal the whole sequence's (it may end
    a sequence), and continuing from its state raises instead of returning wrong logits."""
    torch.manual_seed(0)
    model = models.build(name).eval()
    m = model.stream_multiple
    assert m > 1
    x = _tokens(2 * m + m // 2 + 3)
    with torch.no_grad():
        whole = model(x).logits
        first = model(x[:, : 2 * m])
        tail = model(x[:, 2 * m :], state=first.state)  # the sequence's short last piece
        assert_close("short last piece", whole[:, 2 * m :], tail.logits, 1e-4)
        cut = m + 8
        head = model(x[:, :cut])
        assert_close("misaligned first piece", whole[:, :cut], head.logits, 1e-4)
        with pytest.raises(ValueError, match=rf"{cut} tokens.*stream_multiple={m}"):
            model(x[:, cut:], state=head.state)


def test_neural_memory_refuses_a_misaligned_state() -> None:
    torch.manual_seed(0)
    mem = NeuralMemory(32, 2, 16)
    x = torch.randn(1, 40, 32)
    _, st = mem(x[:, :24])
    assert not st.aligned
    with pytest.raises(ValueError, match="chunk_size=16.*next piece of 16"):
        mem(x[:, 24:], st)
    _, st = mem(x[:, :32])
    assert st.aligned and st.detach().aligned


@pytest.mark.parametrize("name", ["titans-mac-tiny", "titans-mag-tiny", "yaad-tiny"])
def test_reference_impl_evaluates_under_no_grad(name: str) -> None:
    """mem_impl='reference' under torch.no_grad() (evaluation) gives the chunked model's logits."""
    torch.manual_seed(0)
    ref = models.build(name, mem_impl="reference").eval()
    chunked = models.build(name, mem_impl="chunked").eval()
    chunked.load_state_dict(ref.state_dict())
    x = _tokens(40)
    with torch.no_grad():
        assert_close("logits", chunked(x).logits, ref(x).logits, 1e-4)


@pytest.mark.parametrize("name", TINY)
def test_float64_end_to_end(name: str) -> None:
    """model.double() runs in float64: logits and the carried memory state are float64, and the
    function is the float32 model's."""
    torch.manual_seed(0)
    m64 = models.build(name).double()
    m32 = models.build(name)
    m32.load_state_dict(m64.state_dict())
    x = _tokens(40)
    out = m64(x)
    assert out.logits.dtype == torch.float64
    mem = out.state[0]["mem"].memory
    assert {w.dtype for w in mem.weights + (mem.momentum or ())} == {torch.float64}
    assert_close("float32 vs float64", out.logits, m32(x).logits.double(), 1e-4)
    out.logits.sum().backward()
    assert all(p.grad.dtype == torch.float64 for p in m64.parameters() if p.grad is not None)


def test_gradcheck_tiny_mac() -> None:
    """Finite differences through a whole (very small) MAC model in float64: every parameter,
    including the memory's initial weights, gates and conv, through the chunked op's hand-written
    backward and the fused input / output nodes."""
    cfg = TitansConfig(
        variant="mac",
        vocab_size=11,
        dim=8,
        n_layers=1,
        n_heads=2,
        mem_heads=2,
        mem_expansion=2,
        chunk_size=2,
        segment_len=4,
        persistent=2,
        ffn_hidden=8,
        max_lr=0.2,
        mem_norm=True,  # the LayerNorm's backward inside the gradcheck too
        mem_impl="chunked",
    )
    torch.manual_seed(0)
    model = Titans(cfg).double()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = _tokens(7, batch=1, seed=3) % 11

    def logits(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
        return out.logits

    assert torch.autograd.gradcheck(logits, params, eps=1e-6, atol=1e-5, fast_mode=True)


def test_large_max_lr_stays_finite() -> None:
    """max_lr = 0.05 with the memory's LayerNorm (NaN within 96 tokens without it) on a few
    hundred random tokens: finite logits and bounded memory weights."""
    torch.manual_seed(0)
    model = models.build("titans-mac-tiny", max_lr=0.05, mem_norm=True).eval()
    with torch.no_grad():
        out = model(_tokens(320))
    assert torch.isfinite(out.logits).all()
    for st in out.state:
        assert max(w.abs().max().item() for w in st["mem"].memory.weights) < 100.0


def test_unstable_max_lr_is_rejected() -> None:
    """Without the norm a depth-2 memory diverges above MAX_LR_WITHOUT_NORM: config error."""
    with pytest.raises(ValueError, match=rf"max_lr=0.05 .*\(0, {MAX_LR_WITHOUT_NORM}\]"):
        TitansConfig(variant="mac", mem_norm=False, max_lr=0.05)
    with pytest.raises(ValueError, match="max_lr=0.0 must be"):
        TitansConfig(max_lr=0.0)
    TitansConfig(variant="mac", mem_norm=False, max_lr=MAX_LR_WITHOUT_NORM)
    TitansConfig(variant="lmm", mem_norm=False, mem_depth=1, max_lr=0.5)  # linear memory


def test_layer_defaults_are_the_config_defaults() -> None:
    """NeuralMemory's defaults are TitansConfig's (the values the presets use): a layer built
    bare is the memory a default config builds (impl "auto", max_lr 0.02, recompute off)."""
    params = inspect.signature(NeuralMemory).parameters
    cfg = TitansConfig()
    pairs = {
        "impl": "mem_impl",
        "max_lr": "max_lr",
        "recompute_every": "mem_recompute_every",
        "depth": "mem_depth",
        "expansion": "mem_expansion",
        "attn_bias": "attn_bias",
        "retention": "retention",
        "momentum": "momentum",
        "norm": "mem_norm",
        "gate_rank": "gate_rank",
    }
    for arg, name in pairs.items():
        assert params[arg].default == getattr(cfg, name), (arg, name)


def test_mem_checkpoint_is_the_deprecated_name_of_mem_recompute_every() -> None:
    """Saved configs and recipes pass mem_checkpoint=N: it builds mem_recompute_every=N (with a
    DeprecationWarning) and the config then holds the value once; a contradiction is refused."""
    with pytest.warns(DeprecationWarning, match="mem_recompute_every"):
        old = TitansConfig(mem_checkpoint=32)
    assert old == TitansConfig(mem_recompute_every=32) and old.mem_checkpoint is None
    assert dataclasses.replace(old, loss_chunk=8).mem_recompute_every == 32
    with pytest.warns(DeprecationWarning):
        built = models.build("titans-lmm-tiny", mem_checkpoint=32)
    assert built.cfg.mem_recompute_every == 32
    with pytest.raises(ValueError, match="deprecated name"):
        TitansConfig(mem_checkpoint=32, mem_recompute_every=64)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        TitansConfig(mem_recompute_every=20)


def test_the_memory_layer_recomputes_what_the_config_says() -> None:
    """mem_recompute_every reaches NeuralMemory.recompute_every; MAC recomputes whole segments
    itself (attention and FFN too), so its memory layer does not do it again inside them."""
    for variant in ("lmm", "mag", "mal"):
        model = Titans(TitansConfig(variant=variant, mem_recompute_every=32))
        assert [b.memory.recompute_every for b in model.layers] == [32, 32]
    mac = Titans(TitansConfig(variant="mac", mem_recompute_every=32))
    assert [b.memory.recompute_every for b in mac.layers] == [0, 0]


def test_fused_loss_says_whether_forward_takes_the_loss() -> None:
    """Titans.fused_loss (what the training task reads): True exactly when loss_chunk > 0, and
    then forward(targets=) returns the loss without logits; read-only."""
    assert not models.build("titans-mac-tiny").fused_loss
    model = models.build("titans-lmm-tiny", loss_chunk=16)
    assert model.fused_loss is True
    tokens = _tokens(33)
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert out.logits is None and out.loss.dim() == 0
    with pytest.raises(AttributeError):
        model.fused_loss = False
