"""Neural memory (Titans / Miras): the oracle `reference.py` beside the fast `chunked.py`.

`neural_memory(..., impl=...)` picks the implementation by name (tests force each one):
"chunked", "reference", "triton" (`triton.py`, imported on first use so importing this package
never imports triton) or "auto" (Triton on CUDA for the rules it covers, chunked otherwise).
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

from torch import Tensor

from models.ops.memory.chunked import memory_chunked
from models.ops.memory.common import (
    ATTN_BIASES,
    RETENTIONS,
    MemoryRule,
    MemoryState,
    effective_weights,
    retrieve,
)
from models.ops.memory.reference import memory_reference


def _memory_triton(*args: Any, **kwargs: Any) -> tuple[Tensor, MemoryState]:
    """impl="triton": imported here so that CPU users of the package never import triton."""
    from models.ops.memory.triton import memory_triton

    return memory_triton(*args, **kwargs)


def _memory_auto(*args: Any, **kwargs: Any) -> tuple[Tensor, MemoryState]:
    """impl="auto": Triton on CUDA when it covers the arguments, the chunked form otherwise."""
    q = args[0] if args else kwargs["q"]
    if not q.is_cuda:  # the default impl of every Titans model: no binding work on CPU
        return memory_chunked(*args, **kwargs)
    call = inspect.signature(memory_chunked).bind(*args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    if importlib.util.find_spec("triton") is not None:
        from models.ops.memory.triton import unsupported_reason

        if (
            unsupported_reason(a["q"], a["v"], a["state"], a["rule"], a["theta"], a["alpha"])
            is None
        ):
            return _memory_triton(*args, **kwargs)
    return memory_chunked(*args, **kwargs)


IMPLS = {
    "auto": _memory_auto,
    "chunked": memory_chunked,
    "reference": memory_reference,
    "triton": _memory_triton,
}


def neural_memory(*args: Any, impl: str = "chunked", **kwargs: Any) -> tuple[Tensor, MemoryState]:
    """Dispatch to `memory_chunked` (default) or another impl (module docstring); same args."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {sorted(IMPLS)}, got {impl!r}")
    return IMPLS[impl](*args, **kwargs)


__all__ = [
    "ATTN_BIASES",
    "IMPLS",
    "RETENTIONS",
    "MemoryRule",
    "MemoryState",
    "effective_weights",
    "memory_chunked",
    "memory_reference",
    "neural_memory",
    "retrieve",
]
