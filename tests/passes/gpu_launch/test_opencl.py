"""gpu_launch.opencl: program builds and the OpenCL facts the CI device (PoCL) shows."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.passes.gpu_launch import KernelCompileError, build
from tests.passes.gpu_launch import programs
from tests.passes.gpu_launch.conftest import launcher_or_skip


@pytest.fixture(scope="module")
def opencl():
    return launcher_or_skip("opencl")


def test_one_program_serves_every_kernel_of_a_module(opencl):
    built = build(programs.transpose_twice(), "opencl")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    opencl.run(built, None, [a, np.zeros((4, 3), np.float32)])
    assert sum(1 for source in opencl.device.programs if source == built.source) == 1


def test_float16_needs_cl_khr_fp16(opencl):
    """PoCL's CPU device has no cl_khr_fp16: a float16 kernel does not build there (edgert's
    GPU kernels are float32)."""
    x = np.arange(8, dtype=np.float16)
    built = build(programs.half_copy(), "opencl")
    if "cl_khr_fp16" in opencl.device.context.devices[0].extensions:
        out = opencl.run(built, None, [x, np.zeros_like(x)])
        np.testing.assert_array_equal(out["out"], x * 2)
        return
    with pytest.raises(KernelCompileError, match="OpenCL rejects kernel half_copy") as info:
        opencl.run(built, None, [x, np.zeros_like(x)])
    assert "Half precision" in info.value.details
