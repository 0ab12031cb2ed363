"""The sequence-model contract (docs/ARCHITECTURE.md), checked on every registered `-tiny` model.

- logits (B, L, vocab);
- causal: changing tokens after t never changes logits at <= t;
- piecewise: feeding pieces (multiples of `model.stream_multiple`) with the carried
  `out.state` gives the logits of feeding the whole sequence;
- device: forward, backward and a carried-state step build nothing off the model's device.
Tolerance: relative RMS 1e-4 in fp32 (the same math in another order).
"""

from __future__ import annotations

import pytest
import torch

import models
from tests._testing import assert_close


def _tiny_sequence_models() -> list[str]:
    return [
        n
        for n in models.list_models()
        if n.endswith("-tiny") and models.get_spec(n).kind == "sequence"
    ]


def _vocab(model) -> int:
    return model.cfg.vocab_size


@pytest.fixture(params=_tiny_sequence_models())
def model(request):
    torch.manual_seed(0)
    m = models.build(request.param).eval()
    return m


def test_shapes(model):
    x = torch.randint(0, _vocab(model), (2, 64))
    out = model(x)
    assert out.logits.shape == (2, 64, _vocab(model))
    assert torch.isfinite(out.logits).all()


def test_causal(model):
    torch.manual_seed(1)
    L, t = 96, 41
    x = torch.randint(0, _vocab(model), (2, L))
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, _vocab(model), (2, L - t - 1))
    a, b = model(x).logits, model(y).logits
    assert torch.equal(x[:, : t + 1], y[:, : t + 1])
    assert_close("logits before the change", a[:, : t + 1], b[:, : t + 1], 1e-5)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-4, "later tokens had no effect at all"


def test_piecewise_equals_whole(model):
    torch.manual_seed(2)
    m = getattr(model, "stream_multiple", 1)
    L = 128
    x = torch.randint(0, _vocab(model), (2, L))
    whole = model(x).logits
    cuts = [0, 2 * m if 2 * m < L else m, L - m if L - m > 2 * m else L, L]
    cuts = sorted(set(cuts))
    state, parts = None, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out = model(x[:, a:b], state=state)
        parts.append(out.logits)
        state = out.state
    assert_close("piecewise logits", whole, torch.cat(parts, dim=1), 1e-4)


@pytest.mark.parametrize("name", _tiny_sequence_models())
def test_everything_stays_on_the_models_device(name):
    """Built, run, back-propagated and continued from its state on the meta device: a tensor
    made on the default (CPU) device anywhere in the model, its ops or their backward fails
    here as it would on a GPU, where CI does not run (as the fused conv's gradient buffer
    once was)."""
    meta = torch.device("meta")
    with meta:
        model = models.build(name)
    x = torch.randint(0, _vocab(model), (2, 128), device=meta)
    out = model(x)
    out.logits.float().sum().backward()
    nxt = model(x[:, :64], state=out.state)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter got a gradient"
    tensors = [out.logits, nxt.logits, *grads]
    assert {t.device for t in tensors} == {meta}
