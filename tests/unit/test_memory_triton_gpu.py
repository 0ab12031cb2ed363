"""Compiled Triton neural memory on CUDA vs the chunked form at model-like head dims.

Runs only where CUDA exists (marked gpu; conftest deselects it elsewhere). A separate module
from test_memory_triton.py, whose fixture imports the kernels under the interpreter: here they
must be compiled. fp32 both sides (IEEE dots in the kernels, no TF32 in torch matmuls).
"""

from __future__ import annotations

import pytest
import torch

from models.ops.memory import MemoryRule, memory_chunked
from tests.unit.test_memory_triton import _check, _inputs, _run

GPU_TOL = 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dims,momentum,chunk,split",
    [
        ([64, 64], True, 64, False),
        ([128, 128], False, 32, False),
        ([64, 256, 64], True, 64, False),
        ([64, 256, 64], True, 64, True),
    ],
    ids=["linear-64-mom", "linear-128", "mlp-64x256-mom", "mlp-64x256-mom-split"],
)
def test_triton_matches_chunked_on_gpu(dims, momentum, chunk, split):
    from models.ops.memory.triton import _INTERPRETED, memory_triton

    assert not _INTERPRETED, "compiled kernels expected on a CUDA machine"
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        rule = MemoryRule()
        kw, names = _inputs(300, 4, dims, momentum, device="cuda")
        ref = _run(memory_chunked, kw, names, chunk, rule)
        out = _run(memory_triton, kw, names, chunk, rule, split=split)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    _check(ref, out, GPU_TOL)
