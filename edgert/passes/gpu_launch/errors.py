"""What the launcher reports to a user: one line each, naming the fix.

A machine without the launcher's packages or devices gets a :class:`MissingPackageError` or a
:class:`NoDeviceError` (both :class:`~edgert.errors.BackendError`): the message names what is
missing and the command that installs it. Arguments a kernel cannot take are a
:class:`LaunchArgumentError`; a device source the driver or naga rejects is a
:class:`KernelCompileError`, its compiler log in ``details``.
"""

from __future__ import annotations

from edgert.errors import BackendError, EdgertError

# what installs each piece on Debian/Ubuntu (the Makefile's `gpu-deps` runs the apt line)
APT_OPENCL = "apt-get install -y pocl-opencl-icd ocl-icd-libopencl1"
APT_VULKAN = "apt-get install -y mesa-vulkan-drivers"
PIP_PACKAGES = {"pyopencl": "pip install pyopencl", "wgpu": "pip install wgpu"}


class MissingPackageError(BackendError):
    """A Python package the backend needs (pyopencl, wgpu) is not installed."""

    def __init__(self, package: str) -> None:
        self.package = package
        super().__init__(f"the GPU launcher needs the Python package {package}, which is not "
                         f"installed; install it with `{PIP_PACKAGES[package]}` (or "
                         "`pip install 'edgert[test]'`)")


class NoDeviceError(BackendError):
    """The backend's package is there but it finds no device (no OpenCL platform, no Vulkan
    adapter)."""

    def __init__(self, what: str, package: str, install: str, cause: str = "") -> None:
        self.package = package
        self.install = install
        cause = cause.strip().splitlines()[0].split(". ")[0][:160] if cause.strip() else ""
        because = f" ({cause})" if cause else ""
        super().__init__(f"no {what} on this machine{because}; install {package} with "
                         f"`{install}`")


class LaunchArgumentError(EdgertError, ValueError):
    """An argument does not fit the kernel: a missing or unknown name, a rank, shape or dtype
    the buffer does not take, a scalar out of its parameter's range."""


class KernelCompileError(EdgertError):
    """The backend rejected a kernel's device source (OpenCL C build, naga's WGSL
    validation). ``details`` holds the compiler's full message."""

    def __init__(self, kernel: str, backend: str, details: str) -> None:
        self.kernel = kernel
        self.backend = backend
        self.details = details
        super().__init__(f"{backend} rejects kernel {kernel}: {_gist(details)}; see .details "
                         "for the compiler's message")


def _gist(details: str) -> str:
    """The most telling line of a compiler log: naga's "error: ..." / "... error ..." line,
    else the last non-blank one."""
    lines = [line.strip() for line in details.splitlines() if line.strip()]
    for line in lines:
        lowered = line.lower()
        if "error" in lowered and not lowered.startswith(("caused by", "validation error")):
            return line[:240]
    return (lines[-1] if lines else "no message")[:240]
