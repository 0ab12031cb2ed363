"""Registry: names, builds, overrides and the papers' parameter counts."""

from __future__ import annotations

import pytest
import torch

import models
from models.sequence.transformer import NOMINAL_PARAMS


def test_list_and_build():
    names = models.list_models()
    assert "transformer-tiny" in names and names == sorted(names)
    m = models.build("transformer-tiny", dim=32, n_heads=2)
    assert m.cfg.dim == 32 and m.embed.weight.shape == (258, 32)


def test_unknown_model_and_field_are_named():
    with pytest.raises(KeyError, match=r"unknown model 'transformer-huge'; known models: .*tiny"):
        models.build("transformer-huge")
    with pytest.raises(ValueError, match=r"no config field\(s\) \['dimm'\]; allowed: .*dim"):
        models.build("transformer-tiny", dimm=3)
    with pytest.raises(ValueError, match=r"dim=30 is not divisible by n_heads=4"):
        models.build("transformer-tiny", dim=30)


@pytest.mark.parametrize("name", sorted(NOMINAL_PARAMS))
def test_paper_sizes_within_two_percent(name):
    with torch.device("meta"):
        m = models.build(name)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - NOMINAL_PARAMS[name]) / NOMINAL_PARAMS[name] < 0.02, f"{name}: {n / 1e6:.1f}M"


def _all_nominal() -> dict[str, float]:
    import importlib

    out: dict[str, float] = {}
    for mod in ("retnet", "landmark", "lightnet", "aaren", "titans", "miras"):
        out.update(importlib.import_module(f"models.sequence.{mod}").NOMINAL_PARAMS)
    return out


@pytest.mark.parametrize("name", sorted(_all_nominal()))
def test_family_sizes_within_two_percent(name):
    nominal = _all_nominal()[name]
    with torch.device("meta"):
        m = models.build(name)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - nominal) / nominal < 0.02, f"{name}: {n / 1e6:.1f}M vs {nominal / 1e6:.0f}M"


def test_miras_presets_have_low_rank_channel_wise_gates():
    """Miras' presets: channel-wise gates from a rank-32 / 64 projection (no momentum); the
    Titans presets keep their paper's one-Linear per-head gates."""
    from models.sequence.miras import NOMINAL_PARAMS as MIRAS
    from models.sequence.titans import NOMINAL_PARAMS as TITANS

    for name in [*MIRAS, "moneta-tiny", "yaad-tiny", "memora-tiny"]:
        with torch.device("meta"):
            m = models.build(name)
        mem = m.layers[0].memory
        assert m.cfg.gate_rank in (32, 64) and not m.cfg.momentum, name
        assert mem.gate_down.weight.shape == (m.cfg.gate_rank, m.cfg.dim), name
    for name in [*TITANS, "titans-mac-tiny"]:
        with torch.device("meta"):
            m = models.build(name)
        assert m.cfg.gate_rank == 0 and not hasattr(m.layers[0].memory, "gate_down"), name
