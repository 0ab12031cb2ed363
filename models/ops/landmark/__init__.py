"""Landmark attention's grouped softmax: a dense row-by-row reference beside the vectorised op."""

from .common import landmark_mask
from .grouped import landmark_attention, landmark_softmax
from .reference import landmark_attention_reference, landmark_softmax_reference

__all__ = [
    "landmark_attention",
    "landmark_attention_reference",
    "landmark_mask",
    "landmark_softmax",
    "landmark_softmax_reference",
]
