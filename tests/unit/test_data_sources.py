"""Byte tokenizer, passkey / NIAH probes, text windows; rank and worker splits; resume."""

from __future__ import annotations

import numpy as np
import pytest

import data
from data.synthetic import make_needle
from data.tokenizers import ByteTokenizer
from system.config import DataConfig


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "héllo wörld ✓"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and ids.max() < 256
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", ["passkey", "niah"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_layout(kind, depth):
    s = make_needle(np.random.default_rng(3), 500, depth=depth, kind=kind)
    text = ByteTokenizer().decode(s.tokens)
    assert len(s.tokens) == 500
    assert text.endswith(s.answer) and s.answer_start == 500 - len(s.answer)
    pos = text.index(s.answer)  # first mention: the needle
    assert pos < s.answer_start
    assert abs(pos / 500 - depth) < 0.2


def test_needle_too_short_is_explained():
    with pytest.raises(ValueError, match="sequence length 20 is too short for a passkey probe"):
        make_needle(np.random.default_rng(0), 20)


def _collect(loader, n):
    it = iter(loader)
    return [next(it)["tokens"] for _ in range(n)]


def _rows(batches):
    return [tuple(r.tolist()) for b in batches for r in b]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_partition_the_global_stream(num_workers):
    cfg = DataConfig(source="passkey", num_workers=num_workers)
    kw = dict(seq_len=128, batch_size=3, seed=5)
    single = _rows(_collect(data.build_loader(cfg, rank=0, world=1, **kw), 4))
    r0 = data.build_loader(cfg, rank=0, world=2, **kw)
    r1 = data.build_loader(cfg, rank=1, world=2, **kw)
    both = _rows(_collect(r0, 2)) + _rows(_collect(r1, 2))
    assert sorted(both) == sorted(single) and len(set(single)) == 12
    assert r0.state_dict() == r1.state_dict() == {"next_index": 12}


def test_resume_on_another_world_size():
    cfg = DataConfig(source="passkey")
    kw = dict(seq_len=128, batch_size=2, seed=1)
    ref = _rows(_collect(data.build_loader(cfg, rank=0, world=1, **kw), 6))
    r0 = data.build_loader(cfg, rank=0, world=2, **kw)
    r1 = data.build_loader(cfg, rank=1, world=2, **kw)
    first = _rows(_collect(r0, 1)) + _rows(_collect(r1, 1))
    resumed = data.build_loader(cfg, rank=0, world=1, **kw)
    resumed.load_state_dict(r0.state_dict())
    rest = _rows(_collect(resumed, 4))
    assert sorted(first + rest) == sorted(ref)
    with pytest.raises(ValueError, match="no 'next_index'"):
        resumed.load_state_dict({"position": 3})


def test_text_source_windows_and_holdout(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    (tmp_path / "a.txt").write_text(" ".join(rng.choice(words, 300)))
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text(" ".join(rng.choice(words, 400)))
    cfg = DataConfig(source="text", path=str(tmp_path), eval_fraction=0.2)
    kw = dict(seq_len=64, batch_size=2, rank=0, world=1, seed=0)
    train = _collect(data.build_loader(cfg, **kw), 3)
    ev = _collect(data.build_loader(cfg, split="eval", **kw), 1)
    assert all(b.shape == (2, 65) for b in train + ev)
    assert not set(_rows(ev)) & set(_rows(train))
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        data.build_loader(DataConfig(source="text", path=str(tmp_path / "nope")), **kw)
    with pytest.raises(ValueError, match="data.eval_fraction > 0"):
        data.build_loader(DataConfig(source="text", path=str(tmp_path)), split="eval", **kw)
