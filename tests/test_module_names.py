"""No module of edgert, its benches or its tests shadows an installed package.

A fresh install once resolved a transformers that imports the Hugging Face package ``kernels``;
a test had put bench/ on ``sys.path``, so transformers imported edgert's bench/kernels.py and
128 tests errored. Two guards: no module or package under the project's source folders is
named like an installed distribution's top-level package, and no source file edits
``sys.path`` (bench/ and tests/ are packages, imported as ``bench.X`` and ``tests.X``).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("edgert", "bench", "tests", "scripts")
SYS_PATH_EDIT = re.compile(r"\bsys\.path\.(insert|append|extend)\(|\bsys\.path\s*(\+=|=)")


def installed_top_level_names() -> dict[str, list[str]]:
    """Top-level importable names of every installed distribution but edgert itself."""
    names = importlib.metadata.packages_distributions()
    return {name: dists for name, dists in names.items()
            if name.isidentifier() and set(dists) != {"edgert"}}


def project_module_names() -> dict[str, list[Path]]:
    """Every module (``x.py``) and package (a folder of .py files) under the source folders,
    by the name it would have if its folder were on ``sys.path``."""
    found: dict[str, list[Path]] = {}
    for folder in SOURCE_DIRS:
        root = ROOT / folder
        found.setdefault(folder, []).append(root)
        for path in root.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            found.setdefault(path.stem, []).append(path)
            parent = path.parent
            if parent != root:
                found.setdefault(parent.name, []).append(parent)
    found.pop("__init__", None)
    found.pop("conftest", None)
    return found


def test_the_name_collector_sees_known_modules():
    names = project_module_names()
    assert {"edgert", "bench", "tests", "engine", "common", "tiny_model", "backends"} <= set(names)
    assert "transformers" in installed_top_level_names()


def test_no_project_module_is_named_like_an_installed_package():
    installed = installed_top_level_names()
    clashes = {name: (sorted(str(p.relative_to(ROOT)) for p in set(paths)), installed[name])
               for name, paths in project_module_names().items() if name in installed}
    assert not clashes, (
        "these modules share a top-level name with an installed package (module paths, "
        f"distributions): {clashes}; rename the module")


def test_no_source_file_edits_sys_path():
    offenders = []
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if SYS_PATH_EDIT.search(line) and path != Path(__file__).resolve():
                    offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, f"sys.path edited in {offenders}: import bench.X / tests.X instead"
