"""Rotary schedules: torchscale's RetNet angles for RetNet, theta^(-2i/K) for everyone else.

The reference formulas are written out here, independently of models/layers/rotary.py: the
"llama" one from RoFormer / Llama, the "torchscale" one from torchscale 0.3.0's `RetNetRelPos`
(`1 / 10000 ** linspace(0, 1, K // 2)`, each angle repeated for the two lanes of its pair) and
its `theta_shift` (x * cos + rotate_every_two(x) * sin).
"""

from __future__ import annotations

import pytest
import torch

import models
from models.layers.rotary import apply_rope, rope_angles, rope_inv_freq
from models.sequence import landmark, titans
from tests._testing import one_thread  # noqa: F401  (autouse: this module runs on 1 thread)


def _llama_freqs(K: int, theta: float = 10000.0) -> torch.Tensor:
    return torch.tensor([theta ** (-2.0 * i / K) for i in range(K // 2)], dtype=torch.float64)


def _torchscale_freqs(K: int) -> torch.Tensor:
    """RetNetRelPos: angle_i = 10000^(-i / (K/2 - 1)), the linspace(0, 1, K/2) exponents."""
    n = K // 2
    return torch.tensor([10000.0 ** (-i / (n - 1)) for i in range(n)], dtype=torch.float64)


def _torchscale_theta_shift(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor):
    """theta_shift(x, sin, cos) with the angle of pair i on lanes 2i and 2i+1."""
    angle = freqs.float().unsqueeze(-1).repeat(1, 2).flatten()  # (f0, f0, f1, f1, ...)
    ang = pos.float()[:, None] * angle[None, :]
    x1, x2 = x[..., ::2], x[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # rotate_every_two
    return x * ang.cos() + rotated * ang.sin()


@pytest.mark.parametrize("K", [16, 64])
def test_torchscale_schedule_is_retnet_relpos_formula(K):
    ours = rope_inv_freq(K, 10000.0, "torchscale").double()
    torch.testing.assert_close(ours, _torchscale_freqs(K), rtol=1e-6, atol=0)
    assert ours[-1].item() == pytest.approx(1e-4, rel=1e-6)  # last pair: exactly 1 / theta
    if K == 16:  # the numbers quoted in the issue
        assert ours[:3].tolist() == pytest.approx([1.0, 0.2683, 0.07197], rel=1e-3)


@pytest.mark.parametrize("K", [16, 64])
def test_llama_schedule_is_default_and_unchanged(K):
    torch.testing.assert_close(rope_inv_freq(K).double(), _llama_freqs(K), rtol=1e-6, atol=0)
    pos = torch.arange(0, 300, 7)
    cos, sin = rope_angles(pos, K)
    ang = pos.double()[:, None] * _llama_freqs(K)[None, :]
    torch.testing.assert_close(cos.double(), ang.cos(), rtol=0, atol=1e-4)
    torch.testing.assert_close(sin.double(), ang.sin(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("K", [16, 64])
def test_pairing_matches_torchscale_theta_shift(K):
    """Given the same angles, apply_rope rotates the same lanes, the same way, as torchscale."""
    x = torch.randn(2, 3, 40, K, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5, 45)
    cos, sin = rope_angles(pos, K, 10000.0, "torchscale")
    ref = _torchscale_theta_shift(x, pos, _torchscale_freqs(K))
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, rtol=0, atol=1e-5)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="schedule='yarn'"):
        rope_inv_freq(16, schedule="yarn")


@torch.no_grad()
def test_transformer_tiny_still_uses_theta_pow_minus_2i_over_k():
    """The whole transformer-tiny forward, rebuilt from its blocks with the written-out
    theta^(-2i/K) angles, is exactly the model's own forward."""
    torch.manual_seed(0)
    model = models.build("transformer-tiny").eval()
    cfg = model.cfg
    K = cfg.dim // cfg.n_heads
    tokens = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))
    ang = torch.arange(29).double()[:, None] * _llama_freqs(K, cfg.rope_theta)[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()
    x = model.embed(tokens)
    for layer in model.layers:
        x, _ = layer(x, cos, sin)
    torch.testing.assert_close(model(tokens).logits, model.head(model.norm(x)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rope", [titans._rope, landmark._rope], ids=["titans", "landmark"])
def test_other_models_rotary_helpers_keep_llama_schedule(rope):
    K = 32
    x = torch.randn(1, 2, 50, K, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(50)
    ang = pos.double()[:, None] * _llama_freqs(K)[None, :]
    ref = apply_rope(x, ang.cos().float(), ang.sin().float())
    torch.testing.assert_close(rope(x, pos, 10000.0), ref, rtol=0, atol=1e-5)
