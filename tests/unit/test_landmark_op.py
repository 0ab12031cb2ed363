"""Landmark grouped softmax: vectorised op with custom backward vs the row-by-row reference.

Also pins the conventions against a scatter-by-group formulation of the upstream algorithm
(epfml/landmark-attention ``lm_benchmark/models/landmark.py``): landmark columns get weight 0,
the current section's landmark is hidden, and landmark queries behave like their section.
"""

from __future__ import annotations

import pytest
import torch

from models.ops.landmark import (
    landmark_attention,
    landmark_attention_reference,
    landmark_mask,
    landmark_softmax,
    landmark_softmax_reference,
)
from tests._testing import assert_close

B, H, D = 2, 3, 13
TOL = 1e-5  # fp32; measured ~1e-7
CASES = [(63, 4), (100, 7), (200, 15), (101, 3)]  # (L, mem_freq): partial last sections


def _scores(L, seed, lead=(B, H)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, L, L, generator=g) * 2.0, torch.randn(*lead, L, L, generator=g)


def _value_and_grad(fn, x, cotangent, *args):
    x = x.clone().requires_grad_()
    out = fn(x, *args)
    (out * cotangent).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("L,mem_freq", CASES)
def test_grouped_softmax_matches_reference(L, mem_freq):
    x, dP = _scores(L, seed=L + mem_freq)
    P_ref, dx_ref = _value_and_grad(landmark_softmax_reference, x, dP, mem_freq)
    P, dx = _value_and_grad(landmark_softmax, x, dP, mem_freq)
    assert_close("P", P_ref, P, TOL)
    assert_close("dscores", dx_ref, dx, TOL)


@pytest.mark.parametrize("L,mem_freq", [(63, 4), (100, 7)])
def test_landmark_attention_matches_reference(L, mem_freq):
    g = torch.Generator().manual_seed(L)
    q, k = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    v, do = torch.randn(B, H, L, 11, generator=g), torch.randn(B, H, L, 11, generator=g)
    grads = []
    for fn in (landmark_attention_reference, landmark_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fn(*leaves, mem_freq)
        (o * do).sum().backward()
        grads.append([o.detach()] + [t.grad for t in leaves])
    for name, r, t in zip(("o", "dq", "dk", "dv"), *grads):
        assert_close(name, r, t, TOL)


def _upstream_style(x: torch.Tensor, mem_freq: int) -> torch.Tensor:
    """Group-index formulation as upstream writes it: scatter max / sum by group, then gate."""
    L = x.shape[-1]
    is_mem = landmark_mask(L, mem_freq).expand(L, L)
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    mem_ids = torch.where(future, 0, torch.cumsum(is_mem.long(), -1) - is_mem.long())
    last = mem_ids == mem_ids.amax(-1, keepdim=True)  # keys in the query's own section
    hidden = future | (is_mem & last)  # the own section's landmark is hidden, even for itself
    last, is_mem = last & ~hidden, is_mem & ~hidden
    x = x.masked_fill(hidden, float("-inf"))
    num_groups = L // (mem_freq + 1) + 2
    bucket = num_groups - 1  # the top-level softmax: own section + visible landmarks
    group_idx = torch.cumsum(is_mem.long(), -1)
    idx = torch.where(last | hidden | is_mem, bucket, group_idx).expand_as(x)
    shape = (*x.shape[:-1], num_groups)
    gmax = x.new_full(shape, float("-inf")).scatter_reduce(-1, idx, x, reduce="amax")
    gmax = gmax.gather(-1, idx)
    e = torch.exp(x - torch.where(torch.isinf(gmax), 0.0, gmax))
    gsum = x.new_zeros(shape).scatter_add(-1, idx, e).gather(-1, idx)
    probs = torch.where(gsum > 0, e / gsum.clamp(min=1e-30), 0.0)
    lm_slot = torch.where(is_mem, group_idx - 1, bucket).expand_as(x)
    group_p = x.new_zeros(shape).scatter_add(-1, lm_slot, probs * is_mem)
    group_p[..., bucket] = (probs * last).sum(-1)
    gate = torch.where(is_mem | last | hidden, last.float(), group_p.gather(-1, idx))
    return probs * gate


@pytest.mark.parametrize("L,mem_freq", CASES)
def test_matches_upstream_group_index_formulation(L, mem_freq):
    x, _ = _scores(L, seed=3)
    assert_close("P", _upstream_style(x, mem_freq), landmark_softmax(x, mem_freq), TOL)


@pytest.mark.parametrize("L,mem_freq", CASES)
def test_structure_rows_causality_landmark_columns(L, mem_freq):
    x, _ = _scores(L, seed=5)
    P = landmark_softmax(x, mem_freq)
    torch.testing.assert_close(P.sum(-1), torch.ones(B, H, L), atol=1e-5, rtol=0)
    assert (P.triu(1) == 0).all(), "future keys must get zero weight"
    assert (P[..., landmark_mask(L, mem_freq)] == 0).all(), "landmark values are never mixed in"
    # changing future scores leaves every row unchanged
    x2 = x + torch.randn_like(x).triu(1) * 10
    torch.testing.assert_close(landmark_softmax(x2, mem_freq), P)


def test_first_section_and_no_landmarks_is_causal_softmax():
    L, mem_freq = 40, 9
    x, _ = _scores(L, seed=8)
    causal = torch.softmax(
        x.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")), -1
    )
    P = landmark_softmax(x, mem_freq)
    assert_close("first section", causal[..., :mem_freq, :], P[..., :mem_freq, :], TOL)
    P_none = landmark_softmax(x, mem_freq=L)  # L <= mem_freq: no landmark in range
    assert_close("no landmarks", causal, P_none, TOL)


def test_landmark_query_row_behaves_like_its_section():
    """A landmark query with the scores of its section's last token gets the same weights."""
    L, mem_freq = 50, 4
    x, _ = _scores(L, seed=9)
    for lm in landmark_mask(L, mem_freq).nonzero().flatten().tolist():
        x[..., lm, :] = x[..., lm - 1, :]
    P = landmark_softmax(x, mem_freq)
    for lm in landmark_mask(L, mem_freq).nonzero().flatten().tolist():
        torch.testing.assert_close(P[..., lm, :], P[..., lm - 1, :])


def test_bf16_scores_and_errors():
    x, dP = _scores(63, seed=11)
    P32 = landmark_softmax(x, 4)
    P16, dx16 = _value_and_grad(landmark_softmax, x.bfloat16(), dP.bfloat16(), 4)
    assert P16.dtype == torch.bfloat16 and dx16.dtype == torch.bfloat16
    assert_close("P bf16", P32, P16, 1e-2)
    with pytest.raises(ValueError, match="mem_freq"):
        landmark_softmax(x, 0)
    with pytest.raises(ValueError, match="square"):
        landmark_softmax(x[..., :5], 4)
