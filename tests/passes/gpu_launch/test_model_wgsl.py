"""A WebGPU build of the tiny model with Medusa heads and DHSA: naga accepts every kernel's WGSL
(``edgert compile --target webgpu`` writes it; nothing here runs it)."""

from __future__ import annotations

import shutil

import pytest

from edgert.passes.gpu_launch import Kernel, KernelCompileError, split_wgsl
from tests.passes.gpu_launch.conftest import launcher_or_skip

EDGERT_KERNELS = ("edgert_tree_attention", "edgert_kv_append", "edgert_dhsa_attention",
                  "edgert_dhsa_boundaries", "edgert_topk", "edgert_kv_commit")


@pytest.fixture(scope="module")
def webgpu_build(tiny_dir, tmp_path_factory):
    """The tiny model exported with (random) Medusa heads and small DHSA parameters (those of
    tests/conftest.py's tiny_dhsa_artifact), compiled for webgpu: {kernel: WGSL}."""
    from edgert.dhsa.params import DHSAParams
    from edgert.export.exporter import ExportOptions, export_model
    from edgert.passes.build import compile_artifact
    from tests.tiny_model import save_random_heads

    root = tmp_path_factory.mktemp("tiny_medusa_dhsa")
    save_random_heads(tiny_dir, root / "heads", seed=0, std=0.3)
    params = DHSAParams(block_size=16, budget=64, local=16, sink=4, dense_tail=8,
                        probe_stride=8, min_context=128, prefill_chunk=64, early_layers=0)
    art = root / "artifact"
    export_model(str(tiny_dir), art, ExportOptions(max_context=512, heads=root / "heads",
                                                   medusa_topk=4, dhsa=params),
                 log=lambda m: None)
    record = compile_artifact(art, "webgpu", log=lambda m: None)
    kernels = {}
    for name in record["files"]:
        assert name.endswith(".wgsl"), name
        kernels.update(split_wgsl((art / "tvm" / "webgpu" / name).read_text()))
    shutil.rmtree(root)
    return kernels


def test_the_build_has_every_edgert_kernel(webgpu_build):
    for kernel in EDGERT_KERNELS:
        assert any(name.startswith(kernel) for name in webgpu_build), kernel
    assert not [name for name, src in webgpu_build.items() if "i64" in src]


def test_naga_accepts_every_kernel(webgpu_build):
    device = launcher_or_skip("webgpu").device
    rejected = {}
    for name, source in sorted(webgpu_build.items()):
        try:
            device.check_shader(Kernel(name, (), (), source))
        except KernelCompileError as exc:
            rejected[name] = exc.details
    assert not rejected, "\n\n".join(f"{name}:\n{why}" for name, why in rejected.items())
