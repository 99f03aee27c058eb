"""`pip install edgert` runs an artifact: the runtime imports none of the extras' packages."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = {"torch", "onnx", "gguf", "safetensors", "transformers", "tvm", "tvm_ffi",
               "onnxscript", "accelerate"}

# a process in which the extras' packages cannot be imported (as after `pip install edgert`)
BLOCKED_RUN = f"""
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {sorted(EXTRAS_ONLY)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
import edgert
engine = edgert.load(sys.argv[1])
result = engine.generate("hello there", max_new_tokens=6, chat=False, medusa=False)
print(len(result.output_ids), sorted(set(sys.modules) & set({sorted(EXTRAS_ONLY)!r})))
"""


def test_base_dependencies_are_the_runtimes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip()
             for dep in project["dependencies"]}
    assert names == {"numpy", "onnxruntime", "tokenizers", "jinja2", "click", "psutil"}
    assert any(dep.startswith("torch") for dep in project["optional-dependencies"]["export"])


def test_an_artifact_loads_and_runs_without_the_extras(tiny_artifact):
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(tiny_artifact)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["6", "[]"]


def test_export_without_its_extra_names_the_install_command(tmp_path):
    script = BLOCKED_RUN.split("import edgert")[0] + (
        "from edgert.cli import main\nsys.argv = ['edgert', 'export', 'x', '-o', sys.argv[1]]\n"
        "main()\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert "pip install 'edgert[export]'" in proc.stderr and "Traceback" not in proc.stderr
