"""The targets ``edgert compile`` builds for: a registry of what each builds and writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

from edgert.errors import BackendError, EdgertError


@dataclass(frozen=True)
class TargetSpec:
    """How edgert builds for a target and what it writes."""

    name: str
    target: dict
    # "library": loadable .so files; "library+source": .so files (cuda: the CUDA kernels inside,
    # as source TVM compiles when the library is loaded, or from the fatbin written next to
    # it) plus the device sources; "source": device sources only (no runtime for them here)
    output: str
    supported: bool = True
    reason: str = ""
    int32_only: bool = False  # no 64-bit integers on the device (WGSL)

    @property
    def gpu(self) -> bool:
        return self.name != "llvm"

    @property
    def writes_library(self) -> bool:
        return self.output.startswith("library")


TARGETS: dict[str, TargetSpec] = {
    "llvm": TargetSpec("llvm", {"kind": "llvm"}, "library"),
    "cuda": TargetSpec("cuda", {"kind": "cuda", "arch": "sm_80"}, "library+source"),
    "opencl": TargetSpec("opencl", {"kind": "opencl"}, "source"),
    "metal": TargetSpec("metal", {"kind": "metal"}, "source"),
    "webgpu": TargetSpec("webgpu", {"kind": "webgpu"}, "source", int32_only=True),
    "vulkan": TargetSpec("vulkan", {"kind": "vulkan"}, "source", supported=False,
                         reason="this TVM build has no SPIR-V backend (target.build.vulkan is "
                                "missing); build TVM with USE_VULKAN=ON to target Vulkan"),
}
SOURCE_EXT = {"cuda": "cu", "opencl": "cl", "metal": "metal", "webgpu": "wgsl"}
# nvcc flags of the fatbins (TVM's own nvcc flags, less --use_fast_math: the GPU's numerics
# should stay close to the CPU's)
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "--expt-relaxed-constexpr"]
NVCC_TIMEOUT_S = 900


def resolve_target(name: str, device: str | None = None, cores: int | None = None):
    """(spec, tvm.target.Target) of a target name; a GPU target gets an llvm host, llvm this
    machine's CPU and core count. EdgertError/BackendError naming the choices otherwise."""
    import tvm

    spec = TARGETS.get(name)
    if spec is None:
        raise EdgertError(f"unknown target '{name}'; choose one of {', '.join(TARGETS)}")
    if not spec.supported:
        raise BackendError(f"cannot compile for {name}: {spec.reason}")
    target = dict(spec.target)
    if name == "llvm":
        import tvm.target.codegen

        target["num-cores"] = cores or os.cpu_count() or 1
        # this machine's CPU (vector width, FMA); a generic x86-64 build is SSE2 only
        target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    if device:
        target["device"] = device
    if spec.gpu:
        return spec, tvm.target.Target(target, host={"kind": "llvm"})
    return spec, tvm.target.Target(target)
