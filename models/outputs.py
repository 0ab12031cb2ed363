"""The sequence-model output contract of DESIGN.md: `out.logits`, `out.state`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SeqOutput:
    """logits (B, L, vocab) and the recurrent / cache state to feed the next piece."""

    logits: torch.Tensor
    state: Any = None
    aux_loss: torch.Tensor | None = None
