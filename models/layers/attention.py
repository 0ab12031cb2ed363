"""Attention dispatch: flash-attn on CUDA when importable, PyTorch SDPA everywhere else.

One function, `attention(q, k, v, ...)`, serves every model: causal with a query offset (KV
cache), sliding windows, and an always-visible key prefix (Titans' persistent memory). The
backend is picked per call by `backend=` or globally by `set_backend()` / the environment
variable MNEMO_ATTN_BACKEND (auto | flash | sdpa), so tests can force each path
(fla's `mode=` habit). Shapes: q (B, H, Lq, D); k, v (B, Hkv, Lk, D) with H % Hkv == 0.
Query i sits at absolute position `q_offset + i`; key j at position j.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from models.layers.precision import upcast

BACKENDS = ("auto", "flash", "sdpa")
_backend = os.environ.get("MNEMO_ATTN_BACKEND", "auto")

try:  # flash-attn is an optional GPU extra
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore[import-not-found]
except Exception:  # ImportError, or a CUDA/ABI mismatch raised at import
    _flash_attn_func = None


def set_backend(name: str) -> None:
    """Force a backend for every later call (tests, benchmarks); `auto` restores the default."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def flash_available() -> bool:
    return _flash_attn_func is not None and torch.cuda.is_available()


def _flash_ok(q: torch.Tensor, prefix: int) -> bool:
    return (
        flash_available()
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and prefix == 0
        and q.shape[-1] <= 256
    )


def resolve_backend(q: torch.Tensor, prefix: int = 0, backend: str | None = None) -> str:
    """Which backend a call with these inputs runs on; a forced backend that can't run raises."""
    want = backend or _backend
    if want not in BACKENDS:
        raise ValueError(f"attention backend {want!r} is unknown; expected one of {BACKENDS}")
    if want == "flash":
        if not _flash_ok(q, prefix):
            raise RuntimeError(
                "attention backend 'flash' was forced but cannot run here: it needs flash-attn "
                f"installed (found: {_flash_attn_func is not None}), a CUDA tensor (got "
                f"{q.device}), fp16/bf16 (got {q.dtype}) and no key prefix (got {prefix})"
            )
        return "flash"
    if want == "auto" and _flash_ok(q, prefix):
        return "flash"
    return "sdpa"


def attention_mask(
    lq: int,
    lk: int,
    *,
    q_offset: int = 0,
    causal: bool = True,
    window: int | None = None,
    prefix: int = 0,
    k_offset: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean mask (lq, lk), True = may attend. Keys sit at positions k_offset + j.

    A key is visible when it is not in the future (causal), within `window` positions of the
    query (window w: the w most recent positions including itself), or among the first
    `prefix` keys (always visible, whatever their position).
    """
    if not causal and window is None:
        return None
    qpos = torch.arange(lq, device=device)[:, None] + q_offset
    kpos = torch.arange(lk, device=device)[None, :] + k_offset
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        ok &= kpos <= qpos
    if window is not None:
        ok &= kpos > qpos - window
    if prefix:
        ok[:, :prefix] = True
    return ok


def _sdpa(q, k, v, mask, scale):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    q_offset: int | None = None,
    window: int | None = None,
    prefix: int = 0,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention; returns (B, H, Lq, D).

    `q_offset` defaults to Lk - Lq (queries are the last Lq positions, the KV-cache case).
    `prefix` keys are always visible; they are stored first in k / v and do not count as
    positions (the remaining keys sit at positions 0..Lk-prefix-1).
    """
    lq, lk = q.shape[2], k.shape[2]
    if q_offset is None:
        q_offset = lk - prefix - lq
    which = resolve_backend(q, prefix, backend)
    if which == "flash":
        bottom_right = q_offset == lk - lq
        if not bottom_right:
            raise RuntimeError("flash-attn needs queries aligned to the end of the keys")
        win = (window - 1, 0) if window is not None else (-1, -1 if not causal else 0)
        out = _flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=causal,
            window_size=win,
            softmax_scale=scale,
        )
        return out.transpose(1, 2)
    if window is not None and causal and lq > 2 * window:
        return _windowed_sdpa(q, k, v, q_offset=q_offset, window=window, prefix=prefix, scale=scale)
    if causal and window is None and prefix == 0 and lq == lk and q_offset == 0:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(
        lq, lk - prefix, q_offset=q_offset, causal=causal, window=window, device=q.device
    )
    if prefix:
        pre = torch.ones(lq, prefix, dtype=torch.bool, device=q.device)
        mask = pre if mask is None else torch.cat([pre, mask], dim=1)
    return _sdpa(q, k, v, mask, scale)


def _windowed_sdpa(q, k, v, *, q_offset, window, prefix, scale):
    """Sliding-window attention in query blocks of `window`: O(L * window) memory, not O(L^2)."""
    lq = q.shape[2]
    outs = []
    pk, pv = k[:, :, :prefix], v[:, :, :prefix]
    kb, vb = k[:, :, prefix:], v[:, :, prefix:]
    for s in range(0, lq, window):
        e = min(s + window, lq)
        a0, a1 = q_offset + s, q_offset + e  # absolute positions of this query block
        k0 = max(0, a0 - window + 1)
        ks = torch.cat([pk, kb[:, :, k0:a1]], dim=2)
        vs = torch.cat([pv, vb[:, :, k0:a1]], dim=2)
        mask = attention_mask(
            e - s, a1 - k0, q_offset=a0, causal=True, window=window, k_offset=k0, device=q.device
        )
        if prefix:
            mask = torch.cat(
                [torch.ones(e - s, prefix, dtype=torch.bool, device=q.device), mask], 1
            )
        outs.append(_sdpa(q[:, :, s:e], ks, vs, mask, scale))
    return torch.cat(outs, dim=2)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain softmax(QK^T) V in fp32 with an explicit boolean mask: the oracle for tests."""
    rep = q.shape[1] // k.shape[1]
    k = upcast(k.repeat_interleave(rep, dim=1), q)
    v = upcast(v.repeat_interleave(rep, dim=1), q)
    s = (upcast(q) @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype)
