"""Run TVM-built GPU kernels (OpenCL C, WGSL) on this machine, without TVM's GPU runtimes.

TVM 0.27's wheel has neither an OpenCL nor a WebGPU runtime, so edgert's tests and
``scripts/gpu_check.sh`` launch the kernels themselves: through pyopencl (PoCL on a CPU
machine) for ``opencl`` and ``opencl -device=adreno``, through wgpu-py (naga validates the
WGSL, Vulkan runs it: Mesa's lavapipe on a CPU machine) for ``webgpu``::

    from edgert.passes import gpu_launch

    built = gpu_launch.build(prim_func_or_irmodule, "opencl -device=adreno")
    outs = gpu_launch.launch(built, "edgert_topk", {"x": x, "values": v, "indices": i})
    # outs: {buffer parameter name: np.ndarray after the run}; unnamed buffers are "arg<i>"

How: ``build`` (:mod:`.build`) runs ``tvm.tirx.build`` and keeps the module as SplitHostDevice
left it: host PrimFuncs plus device kernels. ``launch`` uploads the arguments
(:mod:`.arguments`), interprets the host PrimFunc with concrete shapes (:mod:`.host`: scratch
allocations, loops, each kernel's operands and grid/block extents) and runs each kernel on the
backend (:mod:`.opencl`, :mod:`.webgpu`, which also packs WebGPU's uniforms and grids the way
TVM's web runtime does).

A machine without the packages or devices gets a :class:`MissingPackageError` or
:class:`NoDeviceError` naming the install command (``make gpu-deps`` in a checkout).
"""

from edgert.passes.gpu_launch.arguments import param_names
from edgert.passes.gpu_launch.build import Built, Kernel, KernelParam, build, gpu_target, split_wgsl
from edgert.passes.gpu_launch.errors import (
    KernelCompileError,
    LaunchArgumentError,
    MissingPackageError,
    NoDeviceError,
)
from edgert.passes.gpu_launch.launcher import BACKENDS, Launcher, launch, shared_launcher

__all__ = ["BACKENDS", "Built", "Kernel", "KernelCompileError", "KernelParam",
           "LaunchArgumentError", "Launcher", "MissingPackageError", "NoDeviceError", "build",
           "gpu_target", "launch", "param_names", "shared_launcher", "split_wgsl"]
