"""The package layering holds: no module imports from a layer above its own.

Layers, lowest first (docs: README "Layout"):

    errors, __about__                 shared by all
    model                             config, loaders, registry, the Medusa head module
    artifact                          the manifest and every contract string (reads model)
    dhsa, medusa                      pure data and NumPy references
    speculative                       drafters and per-step token trees (reads medusa)
    export, passes                    producers (neither imports the other)
    runtime                           consumer of artifacts only
    train, serve                      tools above the Engine (training, the HTTP server)
    cli                               the command line

Every import of an ``edgert`` module counts, at module level or inside a function (a lazy
import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgert"
RANK = {"errors": 0, "__about__": 0, "model": 1, "artifact": 2, "dhsa": 3, "medusa": 3,
        "speculative": 4, "export": 4, "passes": 4, "runtime": 5, "train": 6, "serve": 6, "cli": 7}


def layer_of(module: str) -> str:
    """``edgert.runtime.engine`` -> ``runtime``; ``edgert`` itself (the public API) -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cli"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def edgert_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``edgert`` import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("edgert")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("edgert"):
                found.append((node.lineno, name))
    return found


def upward_imports(path: Path) -> list[str]:
    own = layer_of(module_name(path))
    bad = []
    for line, imported in edgert_imports(path):
        target = layer_of(imported)
        if imported == "edgert" or target == own:
            continue
        siblings = RANK[target] == RANK[own] and target != own
        if RANK[target] > RANK[own] or siblings:
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {imported}")
    return bad


def test_every_layer_is_ranked():
    layers = {layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert layers - set(RANK) == set(), "a new package needs a place in RANK"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    fake = PACKAGE / "model" / "_layering_probe.py"
    source = "def f():\n    from edgert.runtime.engine import Engine\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert upward_imports(fake) == [
        "edgert/model/_layering_probe.py:2 (model) imports edgert.runtime.engine"]


@pytest.mark.parametrize("layer", sorted(set(RANK) - {"errors", "__about__", "cli"}))
def test_no_import_runs_up_the_layering(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    offenders = [bad for path in files for bad in upward_imports(path)]
    assert not offenders, "\n".join(offenders)
