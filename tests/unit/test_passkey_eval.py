"""The passkey training signal and its in-training score: the answer-weighted loss mask sits on
exactly the answer's targets, small alphabets draw only their digits, and the eval counts a key
as retrieved only when every digit is predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import data
from data.synthetic import make_needle
from data.tokenizers import ByteTokenizer
from system.config import DataConfig
from system.trainer import passkey_hits


def test_loss_mask_weights_exactly_the_answer():
    cfg = DataConfig(source="passkey", filler_loss_weight=0.05, passkey_digits=3)
    batch = next(iter(data.build_loader(cfg, seq_len=128, batch_size=4, rank=0, world=1, seed=2)))
    tokens, mask = batch["tokens"], batch["loss_mask"]
    assert mask.shape == (4, 128)
    tok = ByteTokenizer()
    for row, m in zip(tokens, mask, strict=True):
        text = tok.decode(row.numpy().astype(np.uint16))
        key = text.split("The pass key is ")[1][:3]
        assert tok.decode(row[1:][m == 1.0].numpy().astype(np.uint16)) == key
        assert torch.allclose(m[m != 1.0], torch.tensor(0.05)) and int((m != 1.0).sum()) == 125
    # weight 1 (the default) is the plain LM loss: no mask in the batch at all
    plain = DataConfig(source="passkey")
    batch = next(iter(data.build_loader(plain, seq_len=128, batch_size=2, rank=0, world=1, seed=2)))
    assert "loss_mask" not in batch


def test_small_alphabet_draws_only_its_digits():
    rng = np.random.default_rng(0)
    keys = [make_needle(rng, 128, digits=5, alphabet=3).answer for _ in range(50)]
    assert set("".join(keys)) == {"0", "1", "2"}
    with pytest.raises(ValueError, match="alphabet=11"):
        make_needle(rng, 128, alphabet=11)


def test_passkey_hits_counts_keys_and_digits():
    rng = np.random.default_rng(1)
    probes = [make_needle(rng, 96, digits=4) for _ in range(3)]
    tokens = torch.as_tensor(np.stack([p.tokens for p in probes]).astype(np.int64))
    # A model that predicts every next token right: one-hot logits of the true targets.
    logits = torch.nn.functional.one_hot(tokens[:, 1:], 258).float()
    assert passkey_hits(logits, tokens, 4) == (3, 12, 3)
    # Row 1 gets its last digit wrong, row 2 its first: no key of theirs counts.
    logits[1, -1] = torch.nn.functional.one_hot((tokens[1, -1] + 1) % 258, 258).float()
    logits[2, -4] = torch.nn.functional.one_hot((tokens[2, -4] + 1) % 258, 258).float()
    assert passkey_hits(logits, tokens, 4) == (1, 10, 3)
    # A wrong filler prediction does not touch the score.
    logits[0, 10] = 0.0
    assert passkey_hits(logits, tokens, 4) == (1, 10, 3)
