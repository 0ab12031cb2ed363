"""Landmark attention, what the vectorised op and the oracle share: the layout's landmark
positions (``reference.py``'s docstring). The fast op (``grouped.py``) imports it from here,
never from the oracle, so the oracle's row-by-row softmax stays independent of it.
"""

from __future__ import annotations

import torch


def landmark_mask(L: int, mem_freq: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (L,): True at landmark positions (every (mem_freq + 1)-th token)."""
    if mem_freq < 1:
        raise ValueError(f"mem_freq must be >= 1; got {mem_freq}")
    return torch.arange(L, device=device) % (mem_freq + 1) == mem_freq
