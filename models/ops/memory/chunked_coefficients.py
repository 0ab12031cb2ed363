"""Neural-memory op, chunked form: the decay / momentum coefficients of a run of chunks.

From the per-token gates (theta, log(1 - alpha), log eta) of each chunk, the unrolled
recurrence's weights (chunked.py's docstring derives them): A[t, s] = β_t / β_s,
E[s, i] = ε_s / ε_i, C = (A @ E) diag(θ), c = A @ ε, built as exp of segment sums of
log-gates (no division, no overflow); per channel for channel-wise gates.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _segsum(x: Tensor) -> Tensor:
    """out[..., t, s] = Σ_{s<j<=t} x[..., j] for s <= t and -inf above the diagonal.

    Summing the masked segment directly (not a difference of cumsums) keeps log-decays exact.
    """
    t = x.shape[-1]
    ones = torch.ones(t, t, dtype=torch.bool, device=x.device)
    xr = x.unsqueeze(-1).expand(*x.shape, t).masked_fill(~torch.tril(ones, -1), 0.0)
    return xr.cumsum(dim=-2).masked_fill(~torch.tril(ones), float("-inf"))


def _end_rows(x: Tensor, last: int) -> Tensor:
    """Row t = T-1 of every chunk (n, G, T, ...), except row `last` of a partial final one."""
    if last == x.shape[2] - 1:
        return x[:, :, -1]
    return torch.cat([x[:-1, :, -1], x[-1:, :, last]], dim=0)


def _coefficients(
    th: Tensor, log_keep: Tensor, log_eta: Tensor | None, last: int
) -> dict[str, Tensor]:
    """Decay / momentum coefficients of a run of chunks at once, (r, G, T, ...) with G = B H,
    from the chunked (r, G, T) theta, log(1 - alpha) and log(eta) (None: no momentum); `last`
    is the final chunk's last real row (T-1 unless the sequence ends inside it).

    With m = 2 state blocks [X; S] (momentum) or m = 1 [X]: `mix` (r, G, m, m) maps the
    chunk-start blocks to the end-of-chunk ones before the writes ([[β, c], [0, ε]] at the last
    token), `wh` (r, G, T, m, 1) weighs token i's outer product in each block (C[last, i],
    E[last, i] θ_i), `bc` (r, G, T, m, 1) weighs the blocks when token t reads ([β_t, c_t]).
    """
    amat = torch.exp(_segsum(log_keep))  # A[t, s] = β_t / β_s
    beta = torch.exp(log_keep.cumsum(dim=-1))
    beta_end = _end_rows(beta, last)
    if log_eta is None:
        cmat = amat * th.unsqueeze(-2)
        return {
            "C": cmat,
            "bc": beta[..., None, None],
            "mix": beta_end[..., None, None],
            "wh": _end_rows(cmat, last)[..., None, None],
        }
    emat = torch.exp(_segsum(log_eta))  # E[s, i] = ε_s / ε_i
    ev = torch.exp(log_eta.cumsum(dim=-1))
    cmat = (amat @ emat) * th.unsqueeze(-2)
    cs = (amat @ ev.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(beta_end)
    mix = torch.stack([beta_end, _end_rows(cs, last), zero, _end_rows(ev, last)], dim=-1)
    wh = torch.stack([_end_rows(cmat, last), _end_rows(emat, last) * th], dim=-1)
    return {
        "C": cmat,
        "bc": torch.stack([beta, cs], dim=-1).unsqueeze(-1),
        "mix": mix.unflatten(-1, (2, 2)),
        "wh": wh.unsqueeze(-1),
    }


def _channel_coefficients(th: Tensor, log_keep: Tensor, last: int) -> dict[str, Tensor]:
    """`_coefficients` for channel-wise gates (no momentum), from (r, G, T, Din) theta and
    log(1 - alpha): the first layer's per-row "C1" (r, G, T, T, Din) = β_t[r] / β_i[r] θ_i[r],
    "bc1" (r, G, T, 1, Din) = β_t, "mix1" (r, G, Din, 1) = β_end (scales X0's rows) and "wh1"
    (r, G, T, 1, Din) = C[end, i] (token i's write weight per row)."""
    amat = torch.exp(_segsum(log_keep.movedim(-1, -2))).movedim(-3, -1)  # (r, G, T, T, Din)
    beta = torch.exp(log_keep.cumsum(dim=-2))
    cmat = amat * th.unsqueeze(-3)
    return {
        "C1": cmat,
        "bc1": beta.unsqueeze(-2),
        "mix1": _end_rows(beta, last).unsqueeze(-1),
        "wh1": _end_rows(cmat, last).unsqueeze(-2),
    }


def _layer_coef(co: dict[str, Tensor], key: str, i: int) -> Tensor:
    """Layer i's write coefficient: the channel-wise one ("mix1", "wh1") for layer 0 when the
    gates are channel-wise, the per-head one otherwise."""
    return co[key + "1"] if i == 0 and key + "1" in co else co[key]
