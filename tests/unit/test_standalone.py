"""The repository stands alone: a clone with nothing beside it has everything it names.

- No tracked file points outside the repository (the folder that held the design notes while
  the project was young sits beside some checkouts, never beside a user's clone).
- Every `*.md` document a file cites exists in the repository.
- Runtime dependencies in pyproject.toml are exactly the third-party packages runtime code
  imports (tests, benchmarks and launchers bring theirs as extras).
- Libraries runtime code imports only when an option turns them on (OPTIONAL) are imported
  inside functions, never at module level, and belong to their named extra and to `dev`.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_DIRS = ("system", "models", "data", "launch")
# Imported lazily only where the hardware has them (CUDA kernels): the `gpu` extra.
GPU_ONLY = {"triton", "flash_attn"}
# Imported lazily only when a config option turns them on: import name -> (extra, distribution).
OPTIONAL = {
    "wandb": ("tracking", "wandb"),  # log.wandb=offline|online
    "torch.utils.tensorboard": ("tracking", "tensorboard"),  # log.tensorboard=true
}
# Spelled in pieces so this file does not match its own search.
OUTSIDE = (".." + "/shared", 'parent / "' + 'shared"', "shared" + "/schemas", "shared" + "/DESIGN")
# Documents by their usual spelling: an upper-case name (README.md) or a path under docs/.
# Lower-case `x.md` names elsewhere are test data (converter inputs), not citations.
MD_REF = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*(?:[A-Z][A-Z0-9_-]*\.md|docs/[\w./-]+\.md))\b")


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout
    return [ROOT / p for p in out.split("\0") if p]


def _text_files() -> list[Path]:
    keep = {".py", ".md", ".toml", ".txt", ".yaml", ".yml", ".sh", ".cfg", ""}
    files = []
    for p in _tracked():
        if p.suffix not in keep or not p.is_file() or "crds" in p.parts:
            continue  # the vendored CRDs are KubeRay's text, not ours
        files.append(p)
    return files


def test_no_file_points_outside_the_repository():
    hits = []
    for p in _text_files():
        text = p.read_text(errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if any(s in line for s in OUTSIDE):
                hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "files name a folder outside the repository:\n" + "\n".join(hits)


def test_every_cited_document_exists():
    tracked = _tracked()
    names = {p.name for p in tracked}
    missing = []
    for p in _text_files():
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for ref in MD_REF.findall(line):
                if "://" in line and ref in line.split("://", 1)[1]:
                    continue  # part of a URL
                here = (p.parent / ref).resolve()
                if here.exists() or (ROOT / ref).exists() or ("/" not in ref and ref in names):
                    continue
                missing.append(f"{p.relative_to(ROOT)}:{n}: {ref}")
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)


def _import_sites() -> list[tuple[str, str, bool]]:
    """(dotted module, file, inside a function?) for every absolute import in runtime code."""
    sites = []
    for d in RUNTIME_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")):
            tree = ast.parse(p.read_text(), str(p))
            in_function = set()
            for fn in ast.walk(tree):
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    sites.append((name, str(p.relative_to(ROOT)), id(node) in in_function))
    return sites


def _optional_key(name: str) -> str | None:
    return next((k for k in OPTIONAL if name == k or name.startswith(k + ".")), None)


def _runtime_imports() -> dict[str, str]:
    """Top-level module -> the first file importing it, over the runtime folders."""
    mods: dict[str, str] = {}
    for name, where, _ in _import_sites():
        mods.setdefault(name.split(".")[0], where)
    return mods


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_runtime_dependencies_are_what_runtime_code_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_canon(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    ours = {"system", "models", "data", "launch"}
    dists = md.packages_distributions()
    needed: dict[str, str] = {}
    for mod, where in _runtime_imports().items():
        if mod in ours or mod in sys.stdlib_module_names or mod in GPU_ONLY or mod in OPTIONAL:
            continue
        assert mod in dists, f"{where} imports {mod!r}, which no installed distribution provides"
        for dist in dists[mod]:
            needed.setdefault(_canon(dist), where)
    undeclared = {d: w for d, w in needed.items() if d not in declared}
    assert not undeclared, f"runtime imports missing from [project] dependencies: {undeclared}"
    unused = declared - set(needed)
    assert not unused, (
        f"[project] dependencies no runtime code imports (make them extras): {unused}"
    )


def test_optional_imports_are_lazy_and_belong_to_their_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {
        name: {_canon(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in reqs}
        for name, reqs in project["optional-dependencies"].items()
    }
    declared = {_canon(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    seen: set[str] = set()
    eager = []
    for name, where, in_function in _import_sites():
        key = _optional_key(name)
        if key is None:
            continue
        seen.add(key)
        if not in_function:
            eager.append(f"{where}: import {name}")
    assert not eager, f"optional libraries imported at module level (import them lazily): {eager}"
    assert seen == set(OPTIONAL), (
        f"OPTIONAL names imports no runtime code has: {set(OPTIONAL) - seen}"
    )
    for key, (extra, dist) in OPTIONAL.items():
        assert dist in extras.get(extra, set()), f"{key} needs {dist!r} in the {extra!r} extra"
        assert dist in extras["dev"], f"{key}: {dist!r} missing from `dev` (tests use it)"
        assert dist not in declared, f"{dist!r} is optional ({extra!r}), not a runtime dependency"
        assert md.version(dist), f"{dist!r} is not installed although `dev` names it"
