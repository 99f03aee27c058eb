"""The OpenCL backend: TVM's OpenCL C kernels through pyopencl (PoCL on a CPU machine).

TVM's OpenCL source is one program holding every kernel of the module; it is compiled once
per source and each launch sets the kernel's arguments in parameter order: ``cl_mem`` for a
buffer, a NumPy scalar of the parameter's dtype for a scalar (int64 stays int64: OpenCL C has
``long``). The launch is ``clEnqueueNDRangeKernel`` with global size = grid x block and local
size = block; TVM's kernels use ``get_group_id``/``get_local_id``.

Float16 kernels need ``cl_khr_fp16``, which PoCL's CPU device does not offer: the program
fails to build there (:class:`~.errors.KernelCompileError`).
"""

from __future__ import annotations

import numpy as np

from edgert.passes.gpu_launch.build import Kernel
from edgert.passes.gpu_launch.device import DeviceArray, LaunchShape
from edgert.passes.gpu_launch.errors import (
    APT_OPENCL,
    KernelCompileError,
    LaunchArgumentError,
    MissingPackageError,
    NoDeviceError,
)


def import_pyopencl():
    """pyopencl, or MissingPackageError naming the install command."""
    try:
        import pyopencl
    except ImportError:
        raise MissingPackageError("pyopencl") from None
    return pyopencl


class OpenCLDevice:
    """The first device of the first OpenCL platform (PYOPENCL_CTX chooses another)."""

    name = "opencl"

    def __init__(self) -> None:
        cl = import_pyopencl()
        self.cl = cl
        try:
            self.context = cl.create_some_context(interactive=False)
        except (cl.Error, RuntimeError) as exc:
            raise NoDeviceError("OpenCL platform", "PoCL", APT_OPENCL,
                                str(exc)) from None
        self.queue = cl.CommandQueue(self.context)
        self.programs: dict[str, object] = {}

    @property
    def description(self) -> str:
        device = self.context.devices[0]
        return f"{device.platform.name}: {device.name}"

    def upload(self, array: np.ndarray, name: str) -> DeviceArray:
        array = np.ascontiguousarray(array)
        flags = self.cl.mem_flags
        if array.nbytes:
            handle = self.cl.Buffer(self.context, flags.READ_WRITE | flags.COPY_HOST_PTR,
                                    hostbuf=array)
        else:  # OpenCL has no empty buffers
            handle = self.cl.Buffer(self.context, flags.READ_WRITE, 4)
        return DeviceArray(handle, array.dtype, array.size, name)

    def download(self, buf: DeviceArray) -> np.ndarray:
        out = np.empty(buf.size, buf.dtype)
        if buf.size:
            self.cl.enqueue_copy(self.queue, out, buf.handle)
        self.queue.finish()
        return out

    def program(self, kernel: Kernel):
        """The compiled program of the kernel's source (cached by source)."""
        program = self.programs.get(kernel.source)
        if program is None:
            try:
                program = self.cl.Program(self.context, kernel.source).build()
            except self.cl.RuntimeError as exc:
                raise KernelCompileError(kernel.name, "OpenCL", str(exc)) from None
            self.programs[kernel.source] = program
        return program

    def run(self, kernel: Kernel, operands: list, shape: LaunchShape) -> None:
        if shape.dyn_shared_bytes:
            raise LaunchArgumentError(f"{kernel.name}: dynamic shared memory is not supported")
        handle = self.cl.Kernel(self.program(kernel), kernel.name)
        for i, (param, value) in enumerate(zip(kernel.params, operands)):
            handle.set_arg(i, value.handle if param.is_buffer else np.dtype(param.dtype).type(
                value))
        if shape.empty:
            return
        self.cl.enqueue_nd_range_kernel(self.queue, handle, shape.global_size, shape.block)

    def finish(self) -> None:
        self.queue.finish()
