"""Launch a built module's entry: upload the arguments, interpret the host function, return
every buffer's contents.

A :class:`Launcher` owns one device (OpenCL or WebGPU) and its caches (compiled programs,
pipelines); :func:`launch` keeps one launcher per backend and one build per module object.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgert.passes.gpu_launch.arguments import bind_arguments
from edgert.passes.gpu_launch.build import Built, build
from edgert.passes.gpu_launch.device import DeviceSession, LaunchRecord
from edgert.passes.gpu_launch.errors import LaunchArgumentError
from edgert.passes.gpu_launch.host import HostInterpreter

BACKENDS = ("opencl", "webgpu")


def open_device(backend: str):
    """The backend's device (MissingPackageError / NoDeviceError when this machine lacks
    it)."""
    if backend == "opencl":
        from edgert.passes.gpu_launch.opencl import OpenCLDevice

        return OpenCLDevice()
    if backend == "webgpu":
        from edgert.passes.gpu_launch.webgpu import WebGPUDevice

        return WebGPUDevice()
    raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")


class Launcher:
    """Runs built kernels on one backend's device.

    ``poison_scratch``: fill host-allocated scratch with 0xFF bytes (NaN, -1) rather than
    zeros, so a kernel that reads scratch before writing it shows it."""

    def __init__(self, backend: str = "opencl", poison_scratch: bool = True) -> None:
        self.backend = backend
        self.device = open_device(backend)
        self.session = DeviceSession(self.device, poison_scratch)

    @property
    def trace(self) -> list[LaunchRecord]:
        """Every launch so far: kernel, grid and block, scalar operands, seconds."""
        return self.session.trace

    def run(self, built: Built, entry: str | None, args, cast: bool = True
            ) -> dict[str, np.ndarray]:
        """Run entry ``entry`` (None: the only one) with ``args`` (a list in parameter order,
        or a dict by :func:`~.arguments.param_names`; NumPy arrays for buffers, numbers for
        scalars). Inputs are left unchanged; returns {name: contents after the run} for every
        buffer parameter, outputs and in-place buffers alike.

        ``cast``: an array of another dtype than its buffer's is converted when no value
        changes (else, and always with ``cast=False``, refused)."""
        if built.backend != self.backend:
            raise LaunchArgumentError(f"a {built.kind} build cannot run on the {self.backend} "
                                      "launcher")
        func = built.entry(entry)
        scope, buffers = bind_arguments(func, args, self.session, cast)
        HostInterpreter(built, self.session, scope).run(func.body)
        self.device.finish()
        return {b.name: self.device.download(b.device).reshape(b.shape) for b in buffers}


_LAUNCHERS: dict[str, Launcher] = {}
_BUILDS: dict[tuple[int, str], tuple[Any, Built]] = {}


def shared_launcher(backend: str) -> Launcher:
    """One launcher per backend for this process."""
    if backend not in _LAUNCHERS:
        _LAUNCHERS[backend] = Launcher(backend)
    return _LAUNCHERS[backend]


def cached_build(mod, target) -> Built:
    """``build(mod, target)``, once per module object and target (the object is kept alive
    with its build, so its id is not reused)."""
    key = (id(mod), str(target))
    if key not in _BUILDS:
        _BUILDS[key] = (mod, build(mod, target))
    return _BUILDS[key][1]


def launch(built, entry: str | None, args, backend: str | None = None,
           launcher: Launcher | None = None, cast: bool = True) -> dict[str, np.ndarray]:
    """Run ``entry`` of ``built`` with ``args`` and return every buffer after the run (see
    :meth:`Launcher.run`).

    ``built``: a :class:`~.build.Built`, or a PrimFunc / IRModule, built here (once per object)
    for ``backend``'s default target ("opencl" or "webgpu"). ``launcher``: the launcher to use
    (default: this process's one for the build's backend)."""
    if not isinstance(built, Built):
        built = cached_build(built, backend or "opencl")
    runner = launcher or shared_launcher(backend or built.backend)
    return runner.run(built, entry, args, cast)
