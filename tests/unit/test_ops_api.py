"""The ops' dispatchers: explicit signatures and one keyword, `impl`, for the form they run."""

from __future__ import annotations

import inspect

import pytest
import torch

from models.ops.memory import MemoryRule, MemoryState, memory_chunked, neural_memory
from models.ops.retention import retention

DISPATCHERS = [neural_memory, retention]


@pytest.mark.parametrize("fn", DISPATCHERS, ids=lambda f: f.__name__)
def test_dispatchers_take_impl_and_name_every_argument(fn) -> None:
    """No *args / **kwargs to rebind: every argument is named, the form keyword-only `impl`."""
    params = inspect.signature(fn).parameters
    varargs = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    assert not [p.name for p in params.values() if p.kind in varargs]
    assert params["impl"].kind is inspect.Parameter.KEYWORD_ONLY


def _memory_args(seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    b, h, length, d = 1, 2, 21, 4
    r = lambda *s: torch.randn(*s, generator=g)
    q, k = (torch.nn.functional.normalize(r(b, h, length, d), dim=-1) for _ in range(2))
    theta, alpha, eta = (torch.sigmoid(r(b, h, length)) * s for s in (0.1, 0.1, 1.0))
    ws = (r(h, d, 2 * d) / 2, r(h, 2 * d, d) / 3)
    return q, k, r(b, h, length, d), theta, alpha, eta, MemoryState(ws), 8, MemoryRule()


def test_neural_memory_passes_its_arguments_through() -> None:
    """Positional or keyword, the dispatcher's result is the chunked op's own (bitwise), and
    checkpoint reaches it; the reference has no checkpoint mode, so asking for one is refused."""
    args = _memory_args()
    y, st = memory_chunked(*args)
    names = list(inspect.signature(neural_memory).parameters)
    for out in (neural_memory(*args), neural_memory(**dict(zip(names, args)), impl="auto")):
        assert torch.equal(y, out[0])
        assert all(torch.equal(a, b) for a, b in zip(st.weights, out[1].weights))
    ckpt = neural_memory(*args, checkpoint=True)[0]
    assert torch.equal(memory_chunked(*args, checkpoint=True)[0], ckpt)
    with pytest.raises(ValueError, match="impl='reference' has none"):
        neural_memory(*args, impl="reference", checkpoint=True)
    with pytest.raises(ValueError, match="impl must be one of"):
        neural_memory(*args, impl="fast")
