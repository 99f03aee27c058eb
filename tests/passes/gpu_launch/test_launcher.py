"""The launcher's self-tests on both backends (PoCL OpenCL, wgpu/lavapipe), and the errors a
machine without them gets."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edgert.errors import BackendError
from edgert.passes import gpu_launch
from edgert.passes.gpu_launch import LaunchArgumentError, MissingPackageError, build, launch
from tests.passes.gpu_launch import programs
from tests.passes.gpu_launch.conftest import TARGETS

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("n", [1, 100, 70000])  # one partial block; a long grid
def test_vector_add(gpu, n):
    built = gpu.build(("vadd",), programs.vadd)
    a, b = (RNG.standard_normal(n).astype(np.float32) for _ in range(2))
    before = a.copy()
    out = gpu.run(built, [a, b, np.zeros(n, np.float32), 1.5, 3])
    np.testing.assert_allclose(out["C"], a * 1.5 + b + 3, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["A"], a)  # every buffer comes back
    np.testing.assert_array_equal(a, before)  # the inputs are not modified


@pytest.mark.parametrize("m, n", [(1, 1), (3, 5), (37, 129)])
def test_2d_grid_with_scratch_shared_by_two_kernels(gpu, m, n):
    built = gpu.build(("transpose_twice",), programs.transpose_twice)
    a = RNG.standard_normal((m, n)).astype(np.float32)
    out = gpu.run(built, {"A": a, "B": np.zeros((n, m), np.float32)})
    np.testing.assert_array_equal(out["B"], a.T * 2)
    first = gpu.launcher.trace[-2]
    assert first.shape.grid == (-(-m // 4), -(-n // 8), 1) and first.shape.block == (4, 8, 1)


def test_int64_shapes_and_scalars_are_narrowed_on_webgpu(gpu):
    """``shift`` takes an int64 scalar and shape: int64 on OpenCL, i32 in WGSL's uniform."""
    built = gpu.build(("shift",), programs.shift)
    x = np.arange(-50, 50, dtype=np.int32)
    for delta in (7, -(2 ** 31) + 100):
        out = gpu.run(built, [x, np.zeros_like(x), delta])
        np.testing.assert_array_equal(out["Out"], x + np.int32(delta))
    if gpu.webgpu:
        assert "i64" not in built.source and "delta: i32" in built.source


def test_out_of_range_scalar_is_refused(gpu):
    """An int32 parameter, and WebGPU's i32 uniform field of an int64 parameter, refuse a
    value they cannot hold instead of wrapping it."""
    built = gpu.build(("vadd",), programs.vadd)
    a = np.zeros(8, np.float32)
    with pytest.raises(LaunchArgumentError, match="does not fit"):
        gpu.run(built, [a, a, a, 1.0, 2 ** 31])
    shift = gpu.build(("shift",), programs.shift)
    x = np.zeros(4, np.int32)
    if gpu.webgpu:
        with pytest.raises(LaunchArgumentError, match="no 64-bit integers"):
            gpu.run(shift, [x, x, 2 ** 40])
    else:  # OpenCL C has long
        assert (gpu.run(shift, [x, x, 2 ** 40 + 5])["Out"] == 5).all()


def test_scratch_is_poisoned(backend):
    target = "webgpu" if backend.backend == "webgpu" else "opencl"
    out = backend.run(build(programs.read_scratch_unwritten(), target), None,
                      [np.zeros(4, np.float32)])
    assert np.isnan(out["out"]).all()


def test_launch_builds_a_prim_func_once_and_takes_names():
    from edgert.passes.gpu_launch.launcher import _BUILDS
    from tests.passes.gpu_launch.conftest import launcher_or_skip

    launcher = launcher_or_skip("opencl")
    func = programs.vadd()
    a = np.ones(5, np.float32)
    for _ in range(2):
        out = launch(func, "vadd", {"A": a, "B": a, "C": a, "alpha": 2.0, "off": 1},
                     launcher=launcher)
        np.testing.assert_array_equal(out["C"], np.full(5, 4, np.float32))
    assert sum(1 for mod, _ in _BUILDS.values() if mod is func) == 1


def test_a_build_runs_only_on_its_backend(backend):
    other = "opencl" if backend.backend == "webgpu" else "webgpu"
    with pytest.raises(ValueError, match="cannot run"):
        backend.run(build(programs.vadd(), other), None, [])


@pytest.mark.parametrize("backend_name, package", [("opencl", "pyopencl"), ("webgpu", "wgpu")])
def test_a_missing_package_names_its_install_command(monkeypatch, backend_name, package):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    with pytest.raises(MissingPackageError, match=f"pip install {package}") as info:
        gpu_launch.Launcher(backend_name)
    assert isinstance(info.value, BackendError) and "\n" not in str(info.value)


OPEN_LAUNCHER = """
import sys
from edgert.passes import gpu_launch
try:
    gpu_launch.Launcher(sys.argv[1])
except gpu_launch.NoDeviceError as exc:
    print(exc)
"""


@pytest.mark.parametrize("backend_name, hide, package", [
    ("opencl", "OCL_ICD_VENDORS", "pocl-opencl-icd"),  # no ICD registered
    ("webgpu", "VK_ICD_FILENAMES", "mesa-vulkan-drivers"),  # no Vulkan driver (GL is left)
])
def test_no_device_names_the_apt_package(tmp_path, backend_name, hide, package):
    """In a fresh process (the loaders read their settings once): one line naming the package
    and its install command."""
    import os
    import subprocess

    pytest.importorskip("pyopencl" if backend_name == "opencl" else "wgpu")
    env = dict(os.environ, **{hide: str(tmp_path / "none.json"), "XDG_RUNTIME_DIR": "/tmp"})
    env.pop("PYOPENCL_CTX", None)
    proc = subprocess.run([sys.executable, "-c", OPEN_LAUNCHER, backend_name], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and f"apt-get install -y {package}" in lines[0], proc.stdout


def test_targets_cover_the_ci_matrix():
    assert TARGETS == {"opencl": "opencl", "adreno": "opencl -device=adreno",
                       "webgpu": "webgpu"}
