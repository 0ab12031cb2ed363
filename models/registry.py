"""Model registry: a size name maps to a builder plus what strategies need to shard it.

Kept as data so `model.py` files stay single-device code: the spec says
which submodules FSDP2 wraps and which are activation-checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """One registered size: `name` -> `builder(config)` with `config = config_fn()`."""

    name: str
    family: str
    config_fn: Callable[[], Any]
    builder: Callable[[Any], nn.Module]
    kind: str = "sequence"  # sequence | vision | super_resolution | neuro | graph
    # What the model is trained for: the loss and eval metrics it is used with (lm: next-token
    # cross-entropy on token sequences, with passkey / needle retrieval as eval).
    task: str = "lm"
    # Attribute holding the repeated blocks: FSDP2 shards and checkpoints each of them.
    block_attr: str = "layers"
    tags: tuple[str, ...] = field(default_factory=tuple)
    # The paper the family comes from (authors year, title, arXiv id): `mnemo models` shows it.
    paper: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a size; a duplicate name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load_families() -> None:
    # Importing a family module registers its sizes; done lazily to keep `import models` cheap.
    import importlib

    for mod in _FAMILY_MODULES:
        importlib.import_module(mod)


# Family modules that register sizes on import. New families add themselves here.
_FAMILY_MODULES: list[str] = [
    "models.sequence.transformer",
    "models.sequence.retnet",
    "models.sequence.landmark",
    "models.sequence.lightnet",
    "models.sequence.aaren",
    "models.sequence.titans",
    "models.sequence.miras",
]


def list_models() -> list[str]:
    """All registered size names, sorted."""
    _load_families()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec of `name`; the error lists the known names."""
    _load_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_config(name: str, **overrides: Any) -> Any:
    """The preset's config dataclass with `overrides` applied (unknown fields are an error)."""
    spec = get_spec(name)
    cfg = spec.config_fn()
    if not overrides:
        return cfg
    assert is_dataclass(cfg), f"config of {name} must be a dataclass"
    known = {f.name for f in fields(cfg)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(
            f"model {name!r} has no config field(s) {bad}; allowed: {', '.join(sorted(known))}"
        )
    return replace(cfg, **overrides)


def build(name: str, **overrides: Any) -> nn.Module:
    """Build model `name` with config `overrides`, e.g. `build("transformer-tiny", dim=64)`."""
    spec = get_spec(name)
    return spec.builder(make_config(name, **overrides))
