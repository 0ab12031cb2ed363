"""The sequence-model output contract (docs/ARCHITECTURE.md, Models): `out.logits`, `out.state`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SeqOutput:
    """logits (B, L, vocab) and the recurrent / cache state to feed the next piece."""

    logits: torch.Tensor | None
    state: Any = None
    aux_loss: torch.Tensor | None = None
    # Set instead of logits when the model computed the loss itself (`targets=` given):
    # long sequences never materialise (B, L, vocab) logits (models/layers/loss.py).
    loss: torch.Tensor | None = None
