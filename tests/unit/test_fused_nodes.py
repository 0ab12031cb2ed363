"""The memory layer's fused ends (models/layers/fused_nodes.py) against their plain-op oracles:
outputs and gradients of every input, odd lengths, batch 2, several heads (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import pytest
import torch

from models.layers.fused_nodes import (
    conv_silu_norm,
    conv_silu_norm_reference,
    norm_gate,
    norm_gate_reference,
)
from tests._testing import assert_close

HEAD_DIM = 8


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], gy: torch.Tensor) -> tuple:
    return torch.autograd.grad(out, inputs, gy, allow_unused=True)


@pytest.mark.parametrize(
    ("kernel", "norm_channels", "length", "rows"),
    [(4, 32, 37, None), (1, 32, 5, None), (4, 0, 37, 16), (3, 48, 70, 16), (4, 32, 37, 7)],
)
def test_conv_silu_norm_matches_reference(
    kernel: int, norm_channels: int, length: int, rows: int | None
) -> None:
    """48 channels = q|k|v of 2 heads x 8; the first norm_channels l2-normalised per head.
    One head's input and weight are zeroed and its bias ~1e-13, so its SiLU output is nonzero
    with a norm under F.normalize's eps: the clamped branch of the backward. rows: token blocks
    (None: the CPU default, one block at these lengths); 16 and 7 leave a partial last block
    and blocks whose conv windows overlap their neighbours' by K - 1 tokens."""
    gen = torch.Generator().manual_seed(kernel + norm_channels)
    chans = 48
    full = torch.randn(2, length + kernel - 1, chans, generator=gen)
    w = torch.randn(chans, kernel, generator=gen)
    b = torch.randn(chans, generator=gen)
    if norm_channels:
        full[..., :HEAD_DIM] = 0.0
        w[:HEAD_DIM] = 0.0
        b[:HEAD_DIM] = 1e-13 * torch.arange(1.0, HEAD_DIM + 1)
    inputs = tuple(t.requires_grad_() for t in (full, w, b))
    got = conv_silu_norm(*inputs, norm_channels, HEAD_DIM, rows=rows)
    want = conv_silu_norm_reference(*inputs, norm_channels, HEAD_DIM)
    assert got.shape == (2, length, chans)
    assert_close("output", want, got, 1e-6)
    gy = torch.randn(got.shape, generator=gen)
    for name, r, g in zip(
        ("full", "weight", "bias"), _grads(want, inputs, gy), _grads(got, inputs, gy)
    ):
        assert_close(f"grad {name}", r, g, 1e-5)


def test_conv_silu_norm_bf16_and_bad_split() -> None:
    """bf16 in, bf16 out (fp32 inside: within bf16 rounding of the fp32 oracle); a norm width
    that does not split into heads is refused by name."""
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(2, 40, 24, generator=gen)
    w, b = torch.randn(24, 4, generator=gen), torch.randn(24, generator=gen)
    got = conv_silu_norm(full.bfloat16(), w.bfloat16(), b.bfloat16(), 16, HEAD_DIM)
    want = conv_silu_norm_reference(
        full.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float(), 16, HEAD_DIM
    )
    assert got.dtype == torch.bfloat16
    assert_close("bf16 output", want, got.float(), 1e-2)
    with pytest.raises(ValueError, match="norm_channels=12"):
        conv_silu_norm(full, w, b, 12, HEAD_DIM)


@pytest.mark.parametrize(("heads", "length", "rows"), [(3, 37, None), (1, 5, None), (3, 37, 16)])
def test_norm_gate_matches_reference(heads: int, length: int, rows: int | None) -> None:
    gen = torch.Generator().manual_seed(heads)
    y = torch.randn(2, heads, length, HEAD_DIM, generator=gen)
    w = torch.randn(HEAD_DIM, generator=gen)
    gate = torch.randn(2, length, heads * HEAD_DIM, generator=gen)
    inputs = tuple(t.requires_grad_() for t in (y, w, gate))
    got = norm_gate(inputs[0], inputs[1], 1e-6, inputs[2], rows=rows)
    want = norm_gate_reference(inputs[0], inputs[1], 1e-6, inputs[2])
    assert_close("output", want, got, 1e-6)
    gy = torch.randn(got.shape, generator=gen)
    for name, r, g in zip(
        ("y", "weight", "gate"), _grads(want, (y, w, gate), gy), _grads(got, (y, w, gate), gy)
    ):
        assert_close(f"grad {name}", r, g, 1e-5)
    with pytest.raises(ValueError, match="gate shape"):
        norm_gate(y, w, 1e-6, gate[..., :-1])


def test_blocked_nodes_keep_the_inputs_device() -> None:
    """Every buffer the blocked forward and backward build lives on the inputs' device. Run on
    the meta device: a buffer made on the default (CPU) device fails there as it would on a GPU,
    where CI does not run."""
    dev = torch.device("meta")
    full = torch.randn(2, 40, 24, device=dev, requires_grad=True)
    w = torch.randn(24, 4, device=dev, requires_grad=True)
    b = torch.randn(24, device=dev, requires_grad=True)
    out = conv_silu_norm(full, w, b, 16, HEAD_DIM, rows=7)
    out.backward(torch.randn_like(out))
    y = torch.randn(2, 3, 37, HEAD_DIM, device=dev, requires_grad=True)
    nw = torch.randn(HEAD_DIM, device=dev, requires_grad=True)
    gate = torch.randn(2, 37, 3 * HEAD_DIM, device=dev, requires_grad=True)
    gated = norm_gate(y, nw, 1e-6, gate, rows=16)
    gated.backward(torch.randn_like(gated))
    tensors = (out, gated, full.grad, w.grad, b.grad, y.grad, nw.grad, gate.grad)
    assert [t.device.type for t in tensors] == ["meta"] * len(tensors)
