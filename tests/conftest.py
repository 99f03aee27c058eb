from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_llama_dir

TINY_CAPACITY = 768
# skips whose reason names this are machines missing the GPU launcher's packages (PoCL,
# lavapipe, pyopencl, wgpu): listed in a banner at the end of the run, never silent
GPU_DEPS_COMMAND = "make gpu-deps"

# ONNX Runtime's optimized-graph cache (runtime/backends/ort_cache.py): a fresh one per run,
# never the user's ~/.cache (subprocesses inherit it)
os.environ["EDGERT_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgert-test-cache-")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_dir, tmp_path_factory) -> Path:
    from edgert.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("tiny_art") / "artifact"
    export_model(str(tiny_dir), out, ExportOptions(max_context=TINY_CAPACITY), log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_medusa_artifact(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model with (random) Medusa heads: 3 heads, top-4 candidates."""


    from edgert.export.exporter import ExportOptions, export_model
    from tests.tiny_model import save_random_heads

    root = tmp_path_factory.mktemp("tiny_medusa")
    save_random_heads(tiny_dir, root / "heads", seed=0, std=0.3)
    art = root / "artifact"
    export_model(str(tiny_dir), art, ExportOptions(max_context=512, heads=root / "heads",
                                                   medusa_topk=4), log=lambda m: None)
    return art


@pytest.fixture(scope="session")
def tiny_dhsa_artifact(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model with a DHSA prefill graph (small parameters: prompts over 128 tokens go
    sparse, in calls of 64 tokens; boundaries at layer 0)."""
    from edgert.dhsa.params import DHSAParams
    from edgert.export.exporter import ExportOptions, export_model

    params = DHSAParams(block_size=16, budget=64, local=16, sink=4, dense_tail=8,
                        probe_stride=8, min_context=128, prefill_chunk=64, early_layers=0)
    out = tmp_path_factory.mktemp("tiny_dhsa") / "artifact"
    export_model(str(tiny_dir), out, ExportOptions(max_context=512, dhsa=params),
                 log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_reference(tiny_dir):
    from tests.tiny_model import load_reference

    return load_reference(tiny_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_artifact):
    import edgert

    return edgert.load(tiny_artifact)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """A loud banner listing the tests skipped for missing GPU launcher packages (the tests
    under tests/passes/gpu_launch execute edgert's kernels on PoCL and wgpu/lavapipe)."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = _skip_reason(report)
        if GPU_DEPS_COMMAND in reason:
            reasons[reason] = reasons.get(reason, 0) + 1
    if not reasons:
        return
    total = sum(reasons.values())
    write = terminalreporter.write_line
    terminalreporter.write_sep("!", f"{total} GPU KERNEL TESTS SKIPPED: missing packages",
                               red=True, bold=True)
    for reason, count in sorted(reasons.items()):
        write(f"  {count:4d} x {reason}", red=True)
    write(f"  These tests execute edgert's kernels on OpenCL (PoCL) and WebGPU (lavapipe); "
          f"install what they need with `{GPU_DEPS_COMMAND}` (as root, or run the sudo "
          "command it prints).", red=True, bold=True)
    terminalreporter.write_sep("!", red=True, bold=True)


def _skip_reason(report) -> str:
    """The reason of a skipped test's report (pytest keeps (path, line, "Skipped: why"))."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)
