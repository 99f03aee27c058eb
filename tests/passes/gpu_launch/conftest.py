"""The GPU targets the launcher tests execute on, one launcher per backend for the session.

``gpu`` is parametrized over ``opencl``, ``adreno`` (``opencl -device=adreno``) and ``webgpu``.
Where a backend's packages or device are missing, its tests skip with a reason that names
what is missing and ``make gpu-deps``; tests/conftest.py lists those skips in a banner at the
end of the run. With EDGERT_REQUIRE_GPU_LAUNCH=1 they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from edgert.errors import BackendError
from edgert.passes import gpu_launch

TARGETS = {"opencl": "opencl", "adreno": "opencl -device=adreno", "webgpu": "webgpu"}
INSTALL_HINT = "run `make gpu-deps`"
_OPENED: dict[str, Any] = {}  # backend -> Launcher, or the reason it is unavailable
_BUILDS: dict[tuple, gpu_launch.Built] = {}


def launcher_or_skip(backend: str) -> gpu_launch.Launcher:
    """This session's launcher for ``backend``; skips (loudly) when the machine lacks it."""
    if backend not in _OPENED:
        try:
            _OPENED[backend] = gpu_launch.Launcher(backend)
        except BackendError as exc:
            _OPENED[backend] = f"GPU launcher: {backend} unavailable: {exc}; {INSTALL_HINT}"
    opened = _OPENED[backend]
    if isinstance(opened, str):
        if os.environ.get("EDGERT_REQUIRE_GPU_LAUNCH") == "1":
            pytest.fail(opened)
        pytest.skip(opened)
    return opened


@dataclass
class GPUTarget:
    """One target the kernels are built for, its launcher, and the session's builds."""

    name: str  # opencl | adreno | webgpu
    target: str
    launcher: gpu_launch.Launcher

    @property
    def webgpu(self) -> bool:
        return self.name == "webgpu"

    @property
    def index_dtype(self) -> str:
        """WGSL has no 64-bit integers: the int32 variant of the kernels that take one."""
        return "int32" if self.webgpu else "int64"

    def build(self, key: tuple, make: Callable[[], Any]) -> gpu_launch.Built:
        """``make()`` (a PrimFunc or IRModule) built for this target, once per session."""
        cache_key = (self.name, *key)
        if cache_key not in _BUILDS:
            _BUILDS[cache_key] = gpu_launch.build(make(), self.target)
        return _BUILDS[cache_key]

    def run(self, built: gpu_launch.Built, args, entry: str | None = None) -> dict:
        return self.launcher.run(built, entry, args)


@pytest.fixture(params=list(TARGETS))
def gpu(request) -> GPUTarget:
    name = request.param
    launcher = launcher_or_skip("webgpu" if name == "webgpu" else "opencl")
    return GPUTarget(name, TARGETS[name], launcher)


@pytest.fixture(params=["opencl", "webgpu"])
def backend(request) -> gpu_launch.Launcher:
    """A launcher per backend (the self-tests run on both)."""
    return launcher_or_skip(request.param)
