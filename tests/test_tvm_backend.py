"""edgert compile + the tvm backend on the tiny model: same tokens as ONNX Runtime."""

from __future__ import annotations

import shutil

import pytest

tvm = pytest.importorskip("tvm")

import edgert  # noqa: E402
from edgert.compile import compile_artifact  # noqa: E402

PROMPTS = ["Explain what a loop is.", "Write a story about a robot.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def compiled(tiny_medusa_artifact, tmp_path_factory):
    """A tiny artifact with (random) Medusa heads, compiled for llvm."""
    root = tmp_path_factory.mktemp("tvm")
    art = root / "artifact"
    shutil.copytree(tiny_medusa_artifact, art)
    compile_artifact(art, "llvm", dump_ir=root / "ir", log=lambda m: None)
    return art, root / "ir"


def test_compile_records_and_dumps(compiled):
    art, ir = compiled
    build = edgert.load(art, verify=False).manifest.compiled["llvm"]
    assert set(build["files"]) == {"decoder.so", "medusa.so"}
    names = sorted(p.name for p in ir.iterdir())
    assert names[:3] == ["decoder-0-import.py", "decoder-1-edgert.py", "decoder-2-legalize.py"]
    assert "edgert_tree_attention" in (ir / "decoder-1-edgert.py").read_text()
    assert "R.concat((past_key_0" not in (ir / "decoder-1-edgert.py").read_text()


@pytest.mark.parametrize("medusa", [False, True])
def test_tvm_backend_matches_ort(compiled, medusa):
    art, _ = compiled
    ort_engine = edgert.load(art)
    tvm_engine = edgert.load(art, backend="tvm")
    for prompt in PROMPTS:
        want = ort_engine.generate(prompt, max_new_tokens=48, medusa=medusa)
        got = tvm_engine.generate(prompt, max_new_tokens=48, medusa=medusa)
        assert got.output_ids == want.output_ids, prompt


def test_tvm_backend_needs_a_build(tiny_artifact):
    with pytest.raises(edgert.ArtifactError, match="edgert compile"):
        edgert.load(tiny_artifact, backend="tvm")


def test_tampered_build_is_refused(compiled, tmp_path):
    art, _ = compiled
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    with open(copy / "tvm" / "llvm" / "decoder.so", "ab") as f:
        f.write(b"x")
    with pytest.raises(edgert.ArtifactError, match="does not match its hash"):
        edgert.load(copy, backend="tvm")


def test_vulkan_is_refused_clearly(compiled):
    art, _ = compiled
    with pytest.raises(edgert.BackendError, match="SPIR-V"):
        compile_artifact(art, "vulkan", log=lambda m: None)


def test_webgpu_is_refused_with_the_reason(compiled):
    art, _ = compiled
    with pytest.raises(edgert.BackendError, match="64-bit integers"):
        compile_artifact(art, "webgpu", log=lambda m: None)
    assert "webgpu" not in edgert.load(art).manifest.compiled


@pytest.mark.parametrize("target, device, ext", [
    ("cuda", None, "cu"),
    ("opencl", None, "cl"),
    ("opencl", "adreno", "cl"),
    ("metal", None, "metal"),
])
def test_gpu_sources_contain_edgert_kernels(compiled, target, device, ext):
    art, _ = compiled
    record = compile_artifact(art, target, device, log=lambda m: None)
    source = (art / "tvm" / target / f"decoder.{ext}").read_text()
    assert "edgert_tree_attention" in source and "edgert_kv_append" in source
    if target == "cuda":
        if shutil.which("nvcc") is None:
            pytest.skip("nvcc not installed: no fatbin")
        assert "decoder.fatbin" in record["files"]
