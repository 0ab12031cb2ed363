"""The oracles are not the library: every op's `reference.py` (memory, retention, scan,
landmark) is imported by its own package only (which offers it as one form, for tests) and by
nothing else under models/: no fast path, no layer, no model. Pieces the oracle and the fast
forms share live in the op's common.py, and the oracle imports nothing else of its op, so a
change to a fast path cannot change the oracle that checks it, nor a change to the oracle the
models (docs/ARCHITECTURE.md). Read from the source (AST), not by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import models.layers.neural_memory as neural_memory_layer
import models.ops.memory
import models.ops.memory.common

ROOT = Path(__file__).resolve().parents[2]
OPS = sorted(p.parent.name for p in (ROOT / "models" / "ops").glob("*/reference.py"))
ORACLES = {f"models.ops.{op}.reference" for op in OPS}
OP_PACKAGES = {f"models.ops.{op}" for op in OPS}
# What selects an oracle by name in a call (impl="reference" / impl="recurrent")
ORACLE_FORMS = {"reference", "recurrent"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in the file, relative imports resolved."""
    package = _module(path) if path.name == "__init__.py" else _module(path.parent)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([mod] if mod else []))
            out.append((mod, [a.name for a in node.names]))
    return out


def _oracle_names() -> set[str]:
    """The functions and classes the oracles define (what only their package may re-export)."""
    names = set()
    for op in OPS:
        tree = ast.parse((ROOT / "models" / "ops" / op / "reference.py").read_text())
        names |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names


def _sources() -> list[Path]:
    return sorted((ROOT / "models").rglob("*.py"))


def test_the_ops_all_have_an_oracle() -> None:
    assert {"landmark", "memory", "retention", "scan"} <= set(OPS)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_under_models_imports_an_oracle(path: Path) -> None:
    """No module under models/ but the op's own package imports its reference.py, or a name
    defined there (through the package either)."""
    name = _module(path)
    if name in ORACLES or name in OP_PACKAGES:
        return
    oracle_names = _oracle_names()
    for mod, names in _imports(path):
        targets = {mod} | {f"{mod}.{n}" for n in names}
        assert not targets & ORACLES, f"{name} imports {mod} {names}"
        assert not set(names) & oracle_names, f"{name} imports the oracle's {names} from {mod}"


@pytest.mark.parametrize("op", OPS)
def test_each_oracle_imports_only_its_common_module(op: str) -> None:
    """reference.py takes nothing from the fast forms beside it: its own recurrence and its
    own autograd gradients, the shared definitions from common.py."""
    path = ROOT / "models" / "ops" / op / "reference.py"
    inside = [m for m, _ in _imports(path) if m.startswith(f"models.ops.{op}")]
    assert set(inside) <= {f"models.ops.{op}.common"}, inside


@pytest.mark.parametrize(
    "path",
    [p for p in _sources() if "ops" not in p.relative_to(ROOT).parts],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_model_selects_an_oracle_form(path: Path) -> None:
    """Layers and models never name an oracle's form ("reference", "recurrent") themselves:
    it is the user's choice (TitansConfig.mem_impl="reference" in evaluation checks), not a
    path they take (RetNet's 1-token decoding once ran the oracle; now `retention_step`)."""
    tree = ast.parse(path.read_text())
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert not named & ORACLE_FORMS, path


def test_mac_reads_the_memory_through_the_shared_retrieve() -> None:
    """MAC's read before each segment (NeuralMemory.retrieve) is common.py's `retrieve`, the one
    the package exports, not a copy beside the oracle."""
    assert neural_memory_layer.memory_retrieve is models.ops.memory.common.retrieve
    assert models.ops.memory.retrieve is models.ops.memory.common.retrieve
