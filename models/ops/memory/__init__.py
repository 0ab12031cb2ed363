"""Neural memory (Titans / Miras): the oracle `reference.py` beside the fast `chunked.py`.

`neural_memory(..., impl=...)` picks the implementation by name (tests force each one):
"chunked" (the default), "reference" (the token loop: tests, evaluation checks), "triton"
(`triton.py`, imported on first use so importing this package never imports triton) or "auto"
(Triton on CUDA for the rules it covers, chunked otherwise: exactly chunked on CPU). `impl` is
the keyword every op's dispatcher takes (models.ops.retention too).
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from models.ops.memory.chunked import memory_chunked
from models.ops.memory.common import (
    ATTN_BIASES,
    DEFAULT_RULE,
    RETENTIONS,
    MemoryRule,
    MemoryState,
    effective_weights,
    retrieve,
)
from models.ops.memory.reference import memory_reference


def _memory_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    alpha: Tensor,
    eta: Tensor | None,
    state: MemoryState,
    chunk_size: int,
    rule: MemoryRule,
    huber_delta: Tensor | None,
    checkpoint: bool,
) -> tuple[Tensor, MemoryState]:
    """impl="triton"."""
    # Deliberately lazy: CPU users of the package (every Titans model on CPU) never import
    # triton, a heavy import that needs TRITON_INTERPRET set before it on CPU.
    from models.ops.memory.triton import memory_triton

    return memory_triton(
        q, k, v, theta, alpha, eta, state, chunk_size, rule, huber_delta, checkpoint
    )


def _triton_covers(
    q: Tensor, v: Tensor, state: MemoryState, rule: MemoryRule, theta: Tensor, alpha: Tensor
) -> bool:
    """Whether impl="auto" takes the Triton path: CUDA tensors, triton installed, and the
    arguments within what the kernels cover (`unsupported_reason`)."""
    if not q.is_cuda or importlib.util.find_spec("triton") is None:
        return False
    # deliberately lazy, as in _memory_triton: only on CUDA with triton installed
    from models.ops.memory.triton import unsupported_reason

    return unsupported_reason(q, v, state, rule, theta, alpha) is None


IMPLS = ("auto", "chunked", "reference", "triton")


def neural_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    alpha: Tensor,
    eta: Tensor | None,
    state: MemoryState,
    chunk_size: int,
    rule: MemoryRule = DEFAULT_RULE,
    huber_delta: Tensor | None = None,
    *,
    impl: str = "chunked",
    checkpoint: bool = False,
) -> tuple[Tensor, MemoryState]:
    """Neural-memory write + retrieve by the implementation `impl` names (module docstring).

    The op's contract (reference.py): q, k (B, H, L, Din); v (B, H, L, Dout); theta, alpha
    (B, H, L), or (B, H, L, Din) channel-wise; eta (B, H, L), None = no momentum; state the
    per-layer (H | B, H, d_in, d_out) weights and momentum; huber_delta (B, H, L) for the huber
    bias. Returns y (B, H, L, Dout) in q's dtype and the final state in the compute dtype.
    checkpoint=True (chunked form) recomputes groups of chunks in backward; the Triton form
    keeps only chunk-start states anyway and ignores it; the reference has no such mode.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    args = (q, k, v, theta, alpha, eta, state, chunk_size, rule, huber_delta)
    if impl == "reference":
        if checkpoint:
            raise ValueError(
                "checkpoint=True is a mode of the chunked form; impl='reference' has none"
            )
        return memory_reference(*args)
    if impl == "triton" or (impl == "auto" and _triton_covers(q, v, state, rule, theta, alpha)):
        return _memory_triton(*args, checkpoint)
    return memory_chunked(*args, checkpoint)


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
