"""RetNet retention: one entry point, ``retention(..., impl=)``, over five interchangeable forms.

impl: "auto" (Triton on CUDA, chunked elsewhere) | "triton" | "chunked" | "parallel" |
"recurrent" (the token-by-token oracle, ``reference.py``). ``impl`` is the keyword every op's
dispatcher takes (models.ops.memory too); ``mode=`` is its deprecated old name, still accepted.
All forms share the contract in ``reference.py`` (scale, normalisations, state layout, offset)
and are tested against the recurrent oracle. The Triton module is imported lazily so CPU users
never need a Triton driver; on CPU, "triton" needs TRITON_INTERPRET=1 set before the first
import of ``models.ops.retention.triton``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

from .chunked import apply_normalizers, retention_chunked
from .common import decay_row_sums, retnet_decay
from .parallel import retention_parallel
from .reference import retention_recurrent
from .step import retention_step

IMPLS = ("auto", "triton", "chunked", "parallel", "recurrent")

__all__ = [
    "IMPLS",
    "apply_normalizers",
    "decay_row_sums",
    "retention",
    "retention_chunked",
    "retention_parallel",
    "retention_recurrent",
    "retention_step",
    "retnet_decay",
]


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def retention(
    q_BHLK: torch.Tensor,
    k_BHLK: torch.Tensor,
    v_BHLV: torch.Tensor,
    decay_H: torch.Tensor,
    *,
    impl: str = "auto",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    offset: int = 0,
    normalize_decay: bool = False,
    normalize_scores: bool = False,
    chunk_size: int = 64,
    mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale retention; returns (o (B, H, L, V) in v's dtype, final state fp32).

    q, k (B, H, L, K); v (B, H, L, V); decay_H gamma per head (``retnet_decay(H)``);
    initial_state (B, H, K, V), or (B, H, K, V + 1) with ``normalize_scores`` (the last column
    carries the decayed key sum); ``offset`` = tokens already folded into initial_state.
    ``chunk_size`` is used by the chunked and Triton forms (Triton: a power of two >= 16).
    ``mode``: the deprecated name of ``impl`` (benchmarks/kernels_gpu.py still passes it).
    """
    if mode is not None:
        warnings.warn(
            "retention(mode=...) is deprecated: pass impl=... (the same values)",
            DeprecationWarning,
            stacklevel=2,
        )
        if impl not in ("auto", mode):
            raise ValueError(f"impl={impl!r} and mode={mode!r} disagree; pass impl= only")
        impl = mode
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "auto":
        impl = "triton" if q_BHLK.is_cuda and _triton_available() else "chunked"
    kwargs = dict(
        scale=scale,
        initial_state=initial_state,
        offset=offset,
        normalize_decay=normalize_decay,
        normalize_scores=normalize_scores,
    )
    if impl == "recurrent":
        return retention_recurrent(q_BHLK, k_BHLK, v_BHLV, decay_H, **kwargs)
    if impl == "parallel":
        return retention_parallel(q_BHLK, k_BHLK, v_BHLV, decay_H, **kwargs)
    if impl == "chunked":
        return retention_chunked(q_BHLK, k_BHLK, v_BHLV, decay_H, chunk_size=chunk_size, **kwargs)
    if not q_BHLK.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before "
            "models.ops.retention.triton is first imported"
        )
    # Deliberately lazy (module docstring): CPU users never import triton or need its driver.
    kernel = importlib.import_module(f"{__name__}.triton")
    return kernel.retention_triton(q_BHLK, k_BHLK, v_BHLV, decay_H, chunk_size=chunk_size, **kwargs)
