"""The WebGPU backend: TVM's WGSL kernels through wgpu-py (wgpu-native: naga, then Vulkan;
Mesa's lavapipe on a CPU machine).

TVM writes each kernel as its own WGSL shader and expects the calling convention of its web
runtime (apache/tvm ``web/src/webgpu.ts``), which this module follows:

- the kernel's buffer operands are bindings 0, 1, ... of group 0, in operand order
  (``var<storage, read>`` unless the kernel writes them);
- its scalar operands, in order, are the 4-byte fields of one uniform struct at the next
  binding (int* as ``i32``, uint* as ``u32``, float* as ``f32``: WGSL has no 64-bit types, so
  TVM narrows int64 scalars and indices to i32 and the host must refuse values that do not
  fit), followed by one ``u32 packGridDimX``, the grid's x extent;
- ``blockIdx.z`` is reserved for grid packing: WebGPU allows 65535 workgroups per dimension,
  so an x extent of 65536 or more is halved (rounded up) into z until it fits; the kernel
  recomputes ``blockIdx.x = z * gridDim.x + x`` and returns early past ``packGridDimX``.
  TVM 0.27's guard is ``blockIdx.x > packGridDimX`` (not ``>=``): where the halving rounds up,
  workgroup ``packGridDimX`` itself runs too. Kernels whose sblocks carry a ``T.where`` guard
  (all of edgert's) are unaffected.

``device.create_shader_module`` is where naga parses and validates the WGSL (reserved words,
types, literals); pipeline creation then translates it to SPIR-V for the Vulkan driver.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from edgert.passes.gpu_launch.build import Kernel
from edgert.passes.gpu_launch.device import DeviceArray, LaunchShape
from edgert.passes.gpu_launch.errors import (
    APT_VULKAN,
    KernelCompileError,
    LaunchArgumentError,
    MissingPackageError,
    NoDeviceError,
)

NATIVE_BACKENDS = ("Vulkan", "Metal", "D3D12")
ADAPTER_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "CPU": 2}
MAX_WORKGROUPS = 65535  # per dimension (WebGPU's maxComputeWorkgroupsPerDimension)
GRID_FIELD = ("packGridDimX", "u32")
WGSL_SCALARS = {"i32": np.int32, "u32": np.uint32, "f32": np.float32}
DTYPE_PREFIX = {"i32": "int", "u32": "uint", "f32": "float"}
# limits raised to the adapter's (kv_commit binds every layer's K and V buffers)
RAISED_LIMITS = ("max-storage-buffers-per-shader-stage", "max-storage-buffer-binding-size",
                 "max-buffer-size", "max-compute-workgroup-storage-size",
                 "max-compute-invocations-per-workgroup", "max-compute-workgroup-size-x")
STORAGE = re.compile(r"@binding\((\d+)\)\s*var<storage,\s*(read|read_write)>\s*(\w+)")
UNIFORM = re.compile(r"@binding\((\d+)\)\s*var<uniform>\s*\w+\s*:\s*(\w+)")


@dataclass(frozen=True)
class StorageBinding:
    binding: int
    name: str
    writable: bool


@dataclass(frozen=True)
class ShaderLayout:
    """A TVM WGSL kernel's bindings: its storage buffers, and the uniform struct's binding
    and fields (the scalars, then ``packGridDimX``)."""

    storage: tuple[StorageBinding, ...]
    uniform_binding: int
    fields: tuple[tuple[str, str], ...]


def shader_layout(kernel: Kernel) -> ShaderLayout:
    """Read the bindings from the kernel's WGSL and check them against its parameters."""
    src = kernel.source
    storage = tuple(StorageBinding(int(b), name, access == "read_write")
                    for b, access, name in STORAGE.findall(src))
    uniforms = UNIFORM.findall(src)
    if len(uniforms) != 1:
        raise ValueError(f"{kernel.name}: expected one uniform struct, found {uniforms}")
    binding, struct = int(uniforms[0][0]), uniforms[0][1]
    body = re.search(r"struct\s+" + struct + r"\s*\{([^}]*)\}", src)
    fields = tuple(re.findall(r"(\w+)\s*:\s*(\w+)", body.group(1) if body else ""))
    buffers, scalars = kernel.buffers, kernel.scalars
    if [s.binding for s in storage] != list(range(len(buffers))) or binding != len(buffers):
        raise ValueError(f"{kernel.name}: bindings {storage} and uniform {binding} do not "
                         f"follow its {len(buffers)} buffer operands")
    if len(fields) != len(scalars) + 1 or fields[-1] != GRID_FIELD:
        raise ValueError(f"{kernel.name}: uniform fields {fields} for scalars {scalars}")
    for (field_name, wgsl_type), param in zip(fields, scalars):
        if not param.dtype.startswith(DTYPE_PREFIX.get(wgsl_type, "?")):
            raise ValueError(f"{kernel.name}: uniform field {field_name}: {wgsl_type} for "
                             f"parameter {param.name}: {param.dtype}")
    return ShaderLayout(storage, binding, fields)


def pack_grid(x: int) -> tuple[int, int]:
    """(x, z) workgroup counts of an x extent, as TVM's web runtime packs it."""
    z = 1
    while x > MAX_WORKGROUPS:
        x, z = (x + 1) // 2, z * 2
    return x, z


def scalar_word(value, wgsl_type: str, what: str) -> bytes:
    """A scalar as its 4-byte uniform field; an integer that does not fit is refused (an
    int64 shape or offset narrowed to i32)."""
    np_type = WGSL_SCALARS[wgsl_type]
    if np_type is np.float32:
        return np.float32(value).tobytes()
    info = np.iinfo(np_type)
    if not info.min <= int(value) <= info.max:
        raise LaunchArgumentError(f"{what} = {value} does not fit WGSL's {wgsl_type} (WebGPU "
                                  "has no 64-bit integers)")
    return np_type(int(value)).tobytes()


def uniform_bytes(kernel: Kernel, layout: ShaderLayout, operands: list, grid_x: int) -> bytes:
    """The uniform struct: each scalar operand in its field's type, then packGridDimX."""
    scalars = [v for p, v in zip(kernel.params, operands) if not p.is_buffer]
    words = [scalar_word(value, wgsl_type, f"{kernel.name}.{name}")
             for (name, wgsl_type), value in zip(layout.fields[:-1], scalars)]
    words.append(np.uint32(grid_x).tobytes())
    return b"".join(words)


def import_wgpu():
    """wgpu, or MissingPackageError naming the install command. The Vulkan loader wants
    XDG_RUNTIME_DIR (it warns on every start without it): the temporary folder if unset."""
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    try:
        import wgpu
    except ImportError:
        raise MissingPackageError("wgpu") from None
    return wgpu


def native_adapter(wgpu):
    """The best adapter of a native API (Vulkan, Metal, D3D12: a GPU before a CPU one), or
    NoDeviceError. wgpu also offers OpenGL adapters (llvmpipe where Mesa's GL is installed),
    whose compute support is a different, partial path: not used."""
    try:
        adapters = wgpu.gpu.enumerate_adapters_sync()
    except Exception as exc:  # wgpu raises RuntimeError or its own GPUError types
        raise NoDeviceError("Vulkan adapter", "Mesa's lavapipe", APT_VULKAN,
                            str(exc)) from None
    native = [a for a in adapters if a.info.get("backend_type") in NATIVE_BACKENDS]
    if not native:
        found = ", ".join(f"{a.info.get('device')} ({a.info.get('backend_type')})"
                          for a in adapters)
        raise NoDeviceError("Vulkan adapter", "Mesa's lavapipe", APT_VULKAN,
                            f"wgpu found {found or 'none'}")
    return min(native, key=lambda a: ADAPTER_RANK.get(a.info.get("adapter_type"), 9))


class WebGPUDevice:
    """A wgpu device on a native adapter (lavapipe where there is no GPU)."""

    name = "webgpu"

    def __init__(self) -> None:
        wgpu = import_wgpu()
        self.wgpu = wgpu
        self.adapter = adapter = native_adapter(wgpu)
        self.features = {f for f in ("shader-f16",) if f in adapter.features}
        limits = adapter.limits
        self.device = adapter.request_device_sync(
            required_features=sorted(self.features),
            required_limits={k: limits[k] for k in RAISED_LIMITS if k in limits})
        self.pipelines: dict[tuple[str, str], tuple] = {}
        # wgpu 0.32.0's queue.on_submitted_work_done_sync() fails (its callback type does not
        # match the bundled wgpu-native): a buffer read waits for the queue instead
        self.fence = self.device.create_buffer(size=4, usage=wgpu.BufferUsage.COPY_SRC)

    @property
    def description(self) -> str:
        info = self.adapter.info
        return f"{info.get('device', '?')} ({info.get('backend_type', '?')})"

    def upload(self, array: np.ndarray, name: str) -> DeviceArray:
        array = np.ascontiguousarray(array)
        padded = max(4, -(-array.nbytes // 4) * 4)  # storage bindings: whole 4-byte words
        usage = self.wgpu.BufferUsage
        handle = self.device.create_buffer_with_data(
            data=array.tobytes() + bytes(padded - array.nbytes),
            usage=usage.STORAGE | usage.COPY_SRC | usage.COPY_DST)
        return DeviceArray(handle, array.dtype, array.size, name)

    def download(self, buf: DeviceArray) -> np.ndarray:
        raw = self.device.queue.read_buffer(buf.handle)
        return np.frombuffer(bytes(raw[:buf.nbytes]), buf.dtype).copy()

    def compile(self, kernel: Kernel):
        """naga's parse and validation of the kernel's WGSL (KernelCompileError with its
        diagnostic when rejected)."""
        try:
            return self.device.create_shader_module(code=kernel.source)
        except Exception as exc:  # wgpu's GPUValidationError
            raise KernelCompileError(kernel.name, "naga (WebGPU)", str(exc)) from None

    def check_shader(self, kernel: Kernel) -> None:
        """Compile the kernel's WGSL as far as a launch would, without running it: naga's
        validation, then a pipeline (its own bind group layout: SPIR-V for the driver)."""
        module = self.compile(kernel)
        try:
            self.device.create_compute_pipeline(
                layout="auto", compute={"module": module, "entry_point": kernel.name})
        except Exception as exc:  # wgpu's GPUValidationError / GPUPipelineError
            raise KernelCompileError(kernel.name, "WebGPU pipeline", str(exc)) from None

    def pipeline(self, kernel: Kernel) -> tuple:
        """(layout, bind group layout, compute pipeline) of a kernel, cached by source."""
        key = (kernel.name, kernel.source)
        if key not in self.pipelines:
            layout = shader_layout(kernel)
            module = self.compile(kernel)
            group_layout = self.device.create_bind_group_layout(entries=self._entries(layout))
            pipeline = self.device.create_compute_pipeline(
                layout=self.device.create_pipeline_layout(bind_group_layouts=[group_layout]),
                compute={"module": module, "entry_point": kernel.name})
            self.pipelines[key] = (layout, group_layout, pipeline)
        return self.pipelines[key]

    def _entries(self, layout: ShaderLayout) -> list[dict]:
        kinds = self.wgpu.BufferBindingType
        compute = self.wgpu.ShaderStage.COMPUTE
        entries = [{"binding": s.binding, "visibility": compute,
                    "buffer": {"type": kinds.storage if s.writable
                               else kinds.read_only_storage}} for s in layout.storage]
        entries.append({"binding": layout.uniform_binding, "visibility": compute,
                        "buffer": {"type": kinds.uniform}})
        return entries

    def run(self, kernel: Kernel, operands: list, shape: LaunchShape) -> None:
        if shape.dyn_shared_bytes:
            raise LaunchArgumentError(f"{kernel.name}: dynamic shared memory is not supported")
        if shape.grid[2] != 1:
            raise LaunchArgumentError(f"{kernel.name}: blockIdx.z is reserved by TVM's WebGPU "
                                      "grid packing")
        layout, group_layout, pipeline = self.pipeline(kernel)
        if shape.empty:
            return
        pod = uniform_bytes(kernel, layout, operands, shape.grid[0])
        usage = self.wgpu.BufferUsage
        uniform = self.device.create_buffer_with_data(data=pod,
                                                      usage=usage.UNIFORM | usage.COPY_DST)
        buffers = [v.handle for p, v in zip(kernel.params, operands) if p.is_buffer]
        entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}}
                   for i, b in enumerate(buffers)]
        entries.append({"binding": layout.uniform_binding,
                        "resource": {"buffer": uniform, "offset": 0, "size": len(pod)}})
        group = self.device.create_bind_group(layout=group_layout, entries=entries)
        x, z = pack_grid(shape.grid[0])
        encoder = self.device.create_command_encoder()
        compute_pass = encoder.begin_compute_pass()
        compute_pass.set_pipeline(pipeline)
        compute_pass.set_bind_group(0, group)
        compute_pass.dispatch_workgroups(x, shape.grid[1], z)
        compute_pass.end()
        self.device.queue.submit([encoder.finish()])

    def finish(self) -> None:
        self.device.queue.read_buffer(self.fence)
