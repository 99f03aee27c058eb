"""edgert compile + the tvm backend on the tiny model: same tokens as ONNX Runtime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import edgert  # noqa: E402
from edgert.passes.build import compile_artifact  # noqa: E402

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
    assert set(build["files"]) == {"decoder.so", "medusa.so", "kv_commit.so"}
    assert build["notes"] == []
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


@pytest.mark.parametrize("medusa", [False, True])
def test_device_kv_cache_matches_ort_and_the_host_cache(compiled, medusa):
    """The GPU's cache code path on the CPU: TVM-allocated buffers, the compiled commit."""
    from edgert.runtime.device_kv_cache import DeviceKVCache
    from edgert.runtime.kv_cache import KVCache

    art, _ = compiled
    ort_engine = edgert.load(art)
    host = edgert.load(art, backend="tvm")
    device = edgert.load(art, backend="tvm", kv_on_device=True)
    assert isinstance(host.cache, KVCache) and isinstance(device.cache, DeviceKVCache)
    for prompt in PROMPTS:
        want = ort_engine.generate(prompt, max_new_tokens=48, medusa=medusa)
        got = device.generate(prompt, max_new_tokens=48, medusa=medusa)
        assert got.output_ids == want.output_ids, prompt
        if medusa:
            assert got.stats["mean_accepted"] == want.stats["mean_accepted"]
        same = host.generate(prompt, max_new_tokens=48, medusa=medusa)
        assert same.output_ids == want.output_ids
        n = host.cache.length
        assert device.cache.length == n
        np.testing.assert_allclose(device.cache.to_numpy()[..., :n, :],
                                   host.cache.storage[..., :n, :], atol=1e-5)


def test_kv_on_device_is_refused_where_it_cannot_be(compiled):
    art, _ = compiled
    with pytest.raises(edgert.BackendError, match="host memory"):
        edgert.load(art, kv_on_device=True)  # the ort backend
    with pytest.raises(edgert.BackendError, match="leave kv_on_device unset"):
        edgert.load(art, backend="tvm", device="cuda", kv_on_device=False)


def test_an_llvm_build_without_the_commit_kernel_is_refused(compiled, tmp_path):
    from edgert.artifact.io import update_manifest

    art, _ = compiled
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    compiled_builds = edgert.load(copy, verify=False).manifest.compiled
    compiled_builds["llvm"]["files"].remove("kv_commit.so")
    update_manifest(copy, {"compiled": compiled_builds})
    assert edgert.load(copy, backend="tvm").generate("Hi", max_new_tokens=4).output_ids
    with pytest.raises(edgert.BackendError, match="no kv_commit.so"):
        edgert.load(copy, backend="tvm", kv_on_device=True)


@pytest.fixture(scope="module")
def cuda_build(compiled):
    """The tiny artifact compiled for cuda (decoder.so etc. with the CUDA kernels inside)."""
    art, _ = compiled
    return compile_artifact(art, "cuda", log=lambda m: None)


def test_cuda_build_is_a_loadable_library(compiled, cuda_build):
    art, _ = compiled
    files = set(cuda_build["files"])
    assert {"decoder.so", "medusa.so", "kv_commit.so", "decoder.cu", "kv_commit.cu"} <= files
    if shutil.which("nvcc") is None:
        assert cuda_build["cuda_kernels"].startswith("source")
        assert any("no nvcc" in note for note in cuda_build["notes"])
    else:
        assert {"decoder.fatbin", "medusa.fatbin", "kv_commit.fatbin"} <= files
        assert cuda_build["notes"] == [] and cuda_build["cuda_kernels"].startswith("fatbin")
    # the libraries carry their CUDA source verbatim: what the loader hands to the compile
    # callback, matched to the fatbin by its hash (see backends.tvm_vm.precompiled_cuda)
    directory = art / "tvm" / "cuda"
    for stem in ("decoder", "medusa", "kv_commit"):
        assert (directory / f"{stem}.cu").read_bytes() in (directory / f"{stem}.so").read_bytes()


def test_precompiled_cuda_serves_the_fatbins_while_loading(tmp_path):
    import tvm_ffi

    from edgert.runtime.backends.tvm_vm import precompiled_cuda

    (tmp_path / "a.cu").write_text("extern \"C\" __global__ void k() {}\n")
    (tmp_path / "a.fatbin").write_bytes(b"P\xedU\xba fatbin")
    before = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    with precompiled_cuda(tmp_path, ["a.so", "a.cu", "a.fatbin"]):
        compile_cuda = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
        assert bytes(compile_cuda((tmp_path / "a.cu").read_text())) == b"P\xedU\xba fatbin"
    assert tvm_ffi.get_global_func("tvm_callback_cuda_compile").same_as(before)  # restored


def test_cuda_without_a_gpu_is_a_clear_error(compiled, cuda_build):
    if tvm.cuda(0).exist:
        pytest.skip("a CUDA device is present (scripts/gpu_check.sh runs the cuda build)")
    art, _ = compiled
    with pytest.raises(edgert.BackendError, match="no CUDA (runtime|device)"):
        edgert.load(art, backend="tvm", device="cuda")


def test_cuda_build_without_library_is_a_clear_error(compiled, cuda_build, tmp_path):
    """A cuda build an older edgert wrote (sources only) is refused before touching CUDA."""
    from edgert.artifact.io import update_manifest

    art, _ = compiled
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    builds = edgert.load(copy, verify=False).manifest.compiled
    builds["cuda"]["files"] = [f for f in builds["cuda"]["files"] if not f.endswith(".so")]
    builds["cuda"]["hashes"] = {f: h for f, h in builds["cuda"]["hashes"].items()
                                if f in builds["cuda"]["files"]}
    update_manifest(copy, {"compiled": builds})
    with pytest.raises(edgert.BackendError, match=r"no loadable library \(decoder.so\)"):
        edgert.load(copy, backend="tvm", device="cuda")
    record = json.loads((copy / "tvm" / "cuda" / "build.json").read_text())
    assert record["output"] == "library+source"


def test_tvm_backend_needs_a_build(tiny_artifact):
    with pytest.raises(edgert.ArtifactError, match="edgert compile"):
        edgert.load(tiny_artifact, backend="tvm")


def test_tampered_build_is_refused(compiled, tmp_path):
    art, _ = compiled
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    with open(copy / "tvm" / "llvm" / "decoder.so", "ab") as f:
        f.write(b"x")
    with pytest.raises(edgert.ArtifactError, match="does not match its recorded SHA-256"):
        edgert.load(copy, backend="tvm")


def test_vulkan_is_refused_clearly(compiled):
    art, _ = compiled
    with pytest.raises(edgert.BackendError, match="SPIR-V"):
        compile_artifact(art, "vulkan", log=lambda m: None)


@pytest.mark.parametrize("target, device, ext", [
    ("cuda", None, "cu"),
    ("opencl", None, "cl"),
    ("opencl", "adreno", "cl"),
    ("metal", None, "metal"),
    ("webgpu", None, "wgsl"),
])
def test_gpu_sources_contain_edgert_kernels(compiled, target, device, ext, request):
    art, _ = compiled
    if target == "cuda":
        record = request.getfixturevalue("cuda_build")
    else:
        record = compile_artifact(art, target, device, log=lambda m: None)
    source = (art / "tvm" / target / f"decoder.{ext}").read_text()
    assert "edgert_tree_attention" in source and "edgert_kv_append" in source
    assert "edgert_kv_commit" in (art / "tvm" / target / f"kv_commit.{ext}").read_text()
    assert f"kv_commit.{ext}" in record["files"]
    if target == "webgpu":  # WGSL has no 64-bit integers; TVM's GPU top-k needs blockIdx.z
        medusa = (art / "tvm" / target / f"medusa.{ext}").read_text()
        assert "edgert_topk" in medusa
        assert not any("i64" in (art / "tvm" / target / f).read_text()
                       for f in record["files"])


def test_threads_size_tvms_pool(compiled, monkeypatch):
    """--threads governs the TVM backend too: the backend sizes TVM's CPU pool with it
    (runtime.config_threadpool; 0 leaves TVM's default), and the output does not depend on
    it."""
    from edgert.runtime.backends import tvm_vm

    art, _ = compiled
    calls = []
    real = tvm_vm.set_cpu_threads
    monkeypatch.setattr(tvm_vm, "set_cpu_threads",
                        lambda ffi, n: (calls.append(n), real(ffi, n)))
    default = edgert.load(art, backend="tvm")
    assert calls == []
    want = default.generate("Explain lists", max_new_tokens=8, speculative="off").output_ids
    one = edgert.load(art, backend="tvm", threads=1)
    assert calls == [1]
    assert one.generate("Explain lists", max_new_tokens=8, speculative="off").output_ids == want
    tvm_vm.set_cpu_threads(__import__("tvm_ffi"), 2)  # back to this machine's cores
