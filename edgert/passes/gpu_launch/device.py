"""What every backend offers the host interpreter: buffers on the device and kernel launches.

A backend (:mod:`.opencl`, :mod:`.webgpu`) implements :class:`Device`; the interpreter
(:mod:`.host`) sees only this interface. Scratch buffers the host allocates are filled with
0xFF bytes (NaN for floats, -1 for integers) unless ``poison_scratch`` is off, so a kernel
reading scratch it never wrote shows it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgert.passes.gpu_launch.build import Kernel

POISON_BYTE = 0xFF


@dataclass
class DeviceArray:
    """A buffer on the device: the backend's handle, the element dtype and count."""

    handle: Any
    dtype: np.dtype
    size: int
    name: str
    scratch: bool = False

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


@dataclass(frozen=True)
class LaunchShape:
    """A kernel launch's extents: blocks per grid and threads per block (x, y, z), and the
    bytes of dynamic shared memory."""

    grid: tuple[int, int, int] = (1, 1, 1)
    block: tuple[int, int, int] = (1, 1, 1)
    dyn_shared_bytes: int = 0

    @property
    def empty(self) -> bool:
        return 0 in self.grid or 0 in self.block

    @property
    def global_size(self) -> tuple[int, int, int]:
        """Threads per axis (OpenCL's global work size)."""
        return tuple(g * b for g, b in zip(self.grid, self.block))


@dataclass(frozen=True)
class LaunchRecord:
    """One launch, as the trace keeps it: the kernel, its extents and its scalar operands."""

    kernel: str
    shape: LaunchShape
    scalars: tuple
    seconds: float


class Device(Protocol):
    """A backend: buffers and launches on one device."""

    name: str

    def upload(self, array: np.ndarray, name: str) -> DeviceArray: ...

    def download(self, buf: DeviceArray) -> np.ndarray: ...

    def run(self, kernel: Kernel, operands: list, shape: LaunchShape) -> None: ...

    def finish(self) -> None: ...


@dataclass
class DeviceSession:
    """A device plus what the launcher keeps about its use: scratch allocation (poisoned or
    zeroed) and a trace of every launch."""

    device: Device
    poison_scratch: bool = True
    trace: list[LaunchRecord] = field(default_factory=list)

    def alloc(self, dtype, size: int, name: str) -> DeviceArray:
        """A scratch buffer of ``size`` elements (0xFF bytes when poisoned, else zeros)."""
        dtype = np.dtype(dtype)
        fill = POISON_BYTE if self.poison_scratch else 0
        host = np.frombuffer(bytes([fill]) * (size * dtype.itemsize), dtype=dtype)
        buf = self.device.upload(host, name)
        buf.scratch = True
        return buf

    def run(self, kernel: Kernel, operands: list, shape: LaunchShape) -> None:
        started = time.perf_counter()
        self.device.run(kernel, operands, shape)
        scalars = tuple(v for p, v in zip(kernel.params, operands) if not p.is_buffer)
        self.trace.append(LaunchRecord(kernel.name, shape, scalars,
                                       time.perf_counter() - started))
