"""Triton kernels of the neural-memory op (host code, dispatch and autograd: triton.py).

Files: primitives.py (dots, GELU, a chunk's coefficients and their backward), linear.py
(depth 1), mlp_tiles.py (depth-2 pieces the two schedules share), mlp_walk.py and mlp_split.py
(the two depth-2 schedules). This package exports the kernels triton.py launches.

Legend: G = B*H, L tokens, NT chunks of b = `chunk` tokens held in a BT-row tile (BT =
max(16, pow2(b)); rows >= the chunk's length n_t are masked and act as θ = 0, α = 0, η = 1),
DK / DN / DV the memory's input / hidden / output widths, BK / BN / BV their tiles. Inputs are
fp32 (G, L, ...) contiguous; states (G, NT + 1, d_in, d_out) hold every chunk-start state.

Per chunk, as chunked.py derives it (l2 bias, l2 retention): the keys through the memory at
the chunk-start weights, δ = 2 (M(k) - v) backpropagated to every layer (token i's gradient
is the outer product z_i δ_iᵀ), C = (A @ E) diag(θ), the masked dual-form retrieval
(Q Zᵀ ⊙ C) Δ and the chunk-end state from C's last row.
  _lin_fwd_kernel / _lin_bwd_kernel  depth 1, grid (DV tiles, G): a state column tile stays
      in registers; backward walks chunks in reverse, writes per-tile partials of dq, dk and
      the gate gradients (summed on the host).
  _mlp_fwd_kernel / _mlp_bwd_kernel  depth 2, grid (G,): the hidden width is walked in BN
      tiles with the state in global memory; the backward recomputes each chunk from its saved
      start state in three passes over the tiles (δ2; then everything that sums over the
      hidden width; then the per-tile weight gradients) and ping-pongs dstate in a 2-slot
      buffer.
  _mlp_part_kernel / _mlp_split_*  depth 2 split, grid (hidden tiles, G), launched per chunk
      (one forward launch, two backward): the hidden-width sums travel through small partial
      buffers between launches (layout and schedule: mlp_split.py's docstring).
Import only after setting TRITON_INTERPRET=1 when running on CPU: ``triton.jit`` picks the
interpreter at import time.
"""

from models.ops.memory.triton_kernels.linear import _lin_bwd_kernel, _lin_fwd_kernel
from models.ops.memory.triton_kernels.mlp_split import (
    _mlp_part_kernel,
    _mlp_split_bwd_out_kernel,
    _mlp_split_bwd_state_kernel,
    _mlp_split_bwd_sum_kernel,
    _mlp_split_fwd_kernel,
)
from models.ops.memory.triton_kernels.mlp_walk import _mlp_bwd_kernel, _mlp_fwd_kernel

__all__ = [
    "_lin_bwd_kernel",
    "_lin_fwd_kernel",
    "_mlp_bwd_kernel",
    "_mlp_fwd_kernel",
    "_mlp_part_kernel",
    "_mlp_split_bwd_out_kernel",
    "_mlp_split_bwd_state_kernel",
    "_mlp_split_bwd_sum_kernel",
    "_mlp_split_fwd_kernel",
]
