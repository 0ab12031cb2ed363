"""Models: `build(name, **overrides)` and `list_models()`; see models/registry.py."""

from models.registry import ModelSpec, build, get_spec, list_models, make_config, register

__all__ = ["ModelSpec", "build", "get_spec", "list_models", "make_config", "register"]
