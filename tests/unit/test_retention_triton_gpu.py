"""Compiled Triton retention on CUDA vs the recurrent oracle at model-like head dims.

Runs only where CUDA exists (marked gpu; conftest deselects it elsewhere). The interpreter
tests in test_retention_triton.py cover odd tiny shapes; here the kernels are compiled and the
shapes are the models' (head dim 64 and 128, a length no chunk divides, batch 2, 3 heads).
The oracle runs in fp32 on the GPU with TF32 off; tolerances as in the interpreter tests.
"""

from __future__ import annotations

import pytest
import torch

from models.ops.retention import retention_recurrent, retnet_decay
from tests._testing import assert_close

FP32_TOL, BF16_TOL = 1e-4, 2e-2


def _fwd_bwd(fn, tensors, dtype, **kwargs):
    """loss = <o, do> + <state, dht>; returns outputs and the gradients of q, k, v, h0."""
    q, k, v, h0, do, dht = tensors
    leaves = [t.detach().clone().to(dtype) for t in (q, k, v)] + [h0.detach().clone()]
    leaves = [t.requires_grad_() for t in leaves]
    o, state = fn(*leaves[:3], retnet_decay(q.shape[1], device="cuda"), initial_state=leaves[3],
                  **kwargs)  # fmt: skip
    ((o.float() * do).sum() + (state.float() * dht).sum()).backward()
    out = {"o": o, "state": state}
    out.update({n: t.grad for n, t in zip(("dq", "dk", "dv", "dh0"), leaves)})
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dim,chunk", [(64, 64), (128, 64)], ids=["d64", "d128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_triton_retention_matches_recurrent(dim, chunk, dtype):
    from models.ops.retention.triton import retention_triton

    g = torch.Generator(device="cuda").manual_seed(dim)
    b, h, length = 2, 3, 300
    shapes = [(b, h, length, dim)] * 3 + [(b, h, dim, dim), (b, h, length, dim), (b, h, dim, dim)]
    tensors = [torch.randn(*s, device="cuda", generator=g) for s in shapes]
    tensors[0], tensors[1] = tensors[0] * dim**-0.5, tensors[1] * dim**-0.5
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        # the oracle sees the same rounded inputs as the kernel, in fp32
        rounded = [t.to(dtype).float() if i < 3 else t for i, t in enumerate(tensors)]
        ref = _fwd_bwd(retention_recurrent, rounded, torch.float32)
        out = _fwd_bwd(retention_triton, tensors, dtype, chunk_size=chunk)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert out["o"].dtype == dtype
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for name in ref:
        assert_close(name, ref[name].float(), out[name].float(), tol)
