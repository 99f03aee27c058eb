"""Build a TIR module for a GPU target and keep what a launcher needs.

``tvm.tirx.build`` runs unchanged; a pass instrument snapshots the IRModule right after
``tirx.SplitHostDevice``. That is the one point of TVM 0.27's pipeline where both halves are
still plain TIR:

- each entry (host) PrimFunc still has its original parameters (buffers with symbolic
  shapes, scalars), its host-side allocations (global scratch buffers the kernels share), and
  one ``tirx.call_ffi_kernel(name, operands..., launch values..., launch_params=[tags])`` per
  kernel launch; later passes turn all of that into packed-function calling code;
- each kernel is a PrimFunc with ``calling_conv == 2`` (a device kernel), its parameters the
  operands of those calls (buffer data pointers, then scalars) and its
  ``tirx.kernel_launch_params`` the launch tags (``blockIdx.x``, ``threadIdx.x``, ...).

The device source comes from the built runtime module's one device import
(``inspect_source()``): an OpenCL C program of every kernel, or, for WebGPU, one WGSL shader
per kernel, concatenated under ``// Function: NAME`` headers (each printed twice), which
:func:`split_wgsl` takes apart.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from edgert.passes.gpu_launch.errors import LaunchArgumentError

SPLIT_PASS = "tirx.SplitHostDevice"
DEVICE_CALLING_CONV = 2  # CallingConv::kDeviceKernelLaunch
WGSL_HEADER = re.compile(r"// Function: (\S+)\s*$")


@dataclass(frozen=True)
class KernelParam:
    """A kernel parameter: a buffer's data pointer (``dtype == "handle"``, its element type in
    ``elem``) or a scalar of ``dtype``."""

    name: str
    dtype: str
    elem: str | None = None

    @property
    def is_buffer(self) -> bool:
        return self.dtype == "handle"


@dataclass
class Kernel:
    """A device kernel: its parameters in operand order, its launch tags, and the source the
    backend compiles (WGSL: the kernel's own shader; OpenCL: the whole program)."""

    name: str
    params: tuple[KernelParam, ...]
    launch_tags: tuple[str, ...]
    source: str

    @property
    def buffers(self) -> tuple[KernelParam, ...]:
        return tuple(p for p in self.params if p.is_buffer)

    @property
    def scalars(self) -> tuple[KernelParam, ...]:
        return tuple(p for p in self.params if not p.is_buffer)


@dataclass
class Built:
    """A module built for a GPU target: its host entries (after SplitHostDevice), kernels
    and device source."""

    target: Any  # tvm.target.Target
    source: str
    entries: dict[str, Any]  # entry name -> host PrimFunc
    kernels: dict[str, Kernel]
    runtime_module: Any = None
    build_seconds: float = 0.0

    @property
    def kind(self) -> str:
        """The target kind: "opencl", "webgpu", ..."""
        return self.target.kind.name

    @property
    def backend(self) -> str:
        """The launcher backend that runs it: "webgpu" for WebGPU, else "opencl"."""
        return "webgpu" if self.kind == "webgpu" else "opencl"

    def entry(self, name: str | None = None):
        """The host PrimFunc of entry ``name`` (None: the only one)."""
        if name is None:
            if len(self.entries) != 1:
                raise LaunchArgumentError(f"the module has entries {sorted(self.entries)}; "
                                          "name one")
            return next(iter(self.entries.values()))
        if name not in self.entries:
            raise LaunchArgumentError(f"no entry {name!r}; entries: {sorted(self.entries)}")
        return self.entries[name]


def gpu_target(target):
    """A ``tvm.target.Target`` with an llvm host from a Target, a dict, or a string such as
    ``"opencl -device=adreno"`` (TVM 0.27's Target takes dicts, not option strings)."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return target if target.host is not None else tvm.target.Target(target, host="llvm")
    if isinstance(target, str):
        kind, *options = target.split()
        spec: dict = {"kind": kind}
        for option in options:
            key, _, value = option.lstrip("-").partition("=")
            spec[key] = value or True
        target = spec
    return tvm.target.Target(dict(target), host={"kind": "llvm"})


def split_wgsl(source: str) -> dict[str, str]:
    """TVM's WebGPU module source -> {kernel name: its own WGSL shader}."""
    chunks: dict[str, list[str]] = {}
    name = None
    for line in source.splitlines(keepends=True):
        header = WGSL_HEADER.match(line)
        if header:
            name = header.group(1)
            if "".join(chunks.get(name, [])).strip():
                raise ValueError(f"kernel {name} appears twice in the WebGPU source")
            chunks[name] = []
        elif name is not None and not line.startswith("//---"):
            chunks[name].append(line)
    return {kernel: "".join(lines) for kernel, lines in chunks.items()}


def build(mod, target="opencl", pass_config: dict | None = None) -> Built:
    """``tvm.tirx.build`` a PrimFunc or IRModule for a GPU target (a Target, a dict or a
    string, see :func:`gpu_target`), keeping the host entries and kernels.

    A PrimFunc without a ``global_symbol`` (private) would get no entry: it is built under
    its GlobalVar's name (in a copy; the caller's module is unchanged)."""
    import tvm

    target = gpu_target(target)
    mod = _with_entries(mod)
    snapshot: dict[str, Any] = {}
    started = time.perf_counter()
    with _snapshot_context(snapshot, pass_config):
        runtime_module = tvm.tirx.build(mod, target)
    seconds = time.perf_counter() - started
    if "split" not in snapshot:
        raise RuntimeError(f"{SPLIT_PASS} did not run: not a GPU build?")
    source = _device_source(runtime_module, target.kind.name)
    entries, kernels = _entries_and_kernels(snapshot["split"], source, target.kind.name)
    return Built(target, source, entries, kernels, runtime_module, seconds)


def _with_entries(mod):
    import tvm

    if isinstance(mod, tvm.tirx.PrimFunc):
        symbol = mod.attrs.get("global_symbol", "main") if mod.attrs else "main"
        mod = tvm.IRModule({str(symbol): mod})
    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and (
                not func.attrs or func.attrs.get("global_symbol") is None):
            func = func.with_attr("global_symbol", gv.name_hint)
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)


def _snapshot_context(snapshot: dict, pass_config: dict | None):
    """The current PassContext (its opt level and config, plus ``pass_config``) with an
    instrument that keeps the module SplitHostDevice returns in ``snapshot["split"]``."""
    import tvm

    @tvm.ir.instrument.pass_instrument
    class KeepSplitModule:
        def run_after_pass(self, mod, info):
            if info.name == SPLIT_PASS:
                snapshot["split"] = mod

    current = tvm.transform.PassContext.current()
    config = dict(current.config) if current.config else {}
    config.update(pass_config or {})
    return tvm.transform.PassContext(opt_level=current.opt_level, config=config,
                                     instruments=[KeepSplitModule()])


def _device_source(runtime_module, kind: str) -> str:
    devices = [m for m in runtime_module.imports if m.kind == kind]
    if len(devices) != 1:
        raise RuntimeError(f"expected one {kind} module in the build, found "
                           f"{[m.kind for m in runtime_module.imports]}")
    return devices[0].inspect_source()


def _entries_and_kernels(split, source: str, kind: str) -> tuple[dict, dict[str, Kernel]]:
    per_kernel = split_wgsl(source) if kind == "webgpu" else {}
    entries, kernels = {}, {}
    for gv, func in split.functions.items():
        attrs = func.attrs or {}
        name = gv.name_hint
        if int(attrs.get("calling_conv", 0)) == DEVICE_CALLING_CONV:
            params = tuple(_kernel_param(p) for p in func.params)
            tags = tuple(str(t) for t in attrs["tirx.kernel_launch_params"])
            kernels[name] = Kernel(name, params, tags, per_kernel.get(name, source))
        elif attrs.get("global_symbol") is not None:
            entries[name] = func
    return entries, kernels


def _kernel_param(var) -> KernelParam:
    """A kernel parameter from its Var: ``T.handle("float32", "global")`` is a buffer of
    float32, anything else a scalar of that dtype."""
    text = str(var.ty)
    pointer = re.match(r'T\.handle\("(\w+)"', text)
    if pointer:
        return KernelParam(var.name, "handle", pointer.group(1))
    if text.startswith("T.handle"):
        return KernelParam(var.name, "handle")
    return KernelParam(var.name, text)
