"""gpu_launch.build: targets, the host/kernel split TVM leaves after SplitHostDevice, WGSL
splitting. No device needed."""

from __future__ import annotations

import pytest

from edgert.passes.gpu_launch import build, gpu_target, split_wgsl
from tests.passes.gpu_launch import programs

WGSL = """// Function: first_kernel
//----------------------------------------
// Function: first_kernel
//----------------------------------------
fn first_kernel() {}
// Function: second_kernel
//----------------------------------------
// Function: second_kernel
//----------------------------------------
fn second_kernel() {}
"""


def test_split_wgsl_gives_each_kernel_its_shader():
    assert split_wgsl(WGSL) == {"first_kernel": "fn first_kernel() {}\n",
                                "second_kernel": "fn second_kernel() {}\n"}


def test_split_wgsl_refuses_a_kernel_twice():
    with pytest.raises(ValueError, match="appears twice"):
        split_wgsl(WGSL + WGSL)


@pytest.mark.parametrize("spec, kind, adreno", [
    ("opencl", "opencl", False),
    ("opencl -device=adreno", "opencl", True),
    ({"kind": "webgpu"}, "webgpu", False),
])
def test_gpu_target_takes_strings_and_dicts(spec, kind, adreno):
    target = gpu_target(spec)
    assert target.kind.name == kind and target.host.kind.name == "llvm"
    assert ("adreno" in target.keys) == adreno


@pytest.mark.parametrize("target", ["opencl", "webgpu"])
def test_build_keeps_the_host_entry_and_its_kernels(target):
    built = build(programs.transpose_twice(), target)
    assert list(built.entries) == ["transpose_twice"]
    assert sorted(built.kernels) == ["transpose_twice_kernel", "transpose_twice_kernel_1"]
    first = built.kernels["transpose_twice_kernel"]
    assert first.launch_tags == ("blockIdx.y", "blockIdx.x", "threadIdx.y", "threadIdx.x")
    assert [p.elem for p in first.buffers] == ["float32", "float32"]
    assert all(not p.is_buffer for p in first.scalars)
    if target == "webgpu":  # each kernel its own shader
        assert "fn transpose_twice_kernel(" in first.source
        assert "transpose_twice_kernel_1" not in first.source
    else:  # one OpenCL program
        assert "transpose_twice_kernel_1" in first.source
    assert built.backend == ("webgpu" if target == "webgpu" else "opencl")


def test_a_private_function_is_built_under_its_name():
    import tvm

    func = programs.vadd().without_attr("global_symbol")
    built = build(tvm.IRModule({"renamed": func}), "opencl")
    assert list(built.entries) == ["renamed"] and built.entry() is built.entries["renamed"]
