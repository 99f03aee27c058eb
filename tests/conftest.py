from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_llama_dir

TINY_CAPACITY = 768

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
