"""Run a host PrimFunc (as SplitHostDevice leaves it) in Python, launching its kernels.

After SplitHostDevice a host PrimFunc is a small statement tree over concrete values once
the arguments are known: ``Bind`` (a let), ``AllocBuffer`` (a global scratch buffer the
kernels share), ``DeclBuffer`` (a flattened view of a buffer: same data), ``For``,
``IfThenElse``, ``AssertStmt``, ``AttrStmt`` (annotations: walked through), ``SeqStmt``, and
``Evaluate`` of ``tirx.call_ffi_kernel`` - a kernel launch. A launch's arguments are the kernel
name, its operands (buffer data pointers, scalars), then one value per launch tag
(``launch_params`` on the call: ``blockIdx.*`` and ``threadIdx.*`` extents, and the bytes of
``tirx.use_dyn_shared_memory``).

:class:`Scope` holds the values of the function's variables: Python numbers (also bound in a
``tvm.sym.Analyzer``, which folds any expression over them to a constant) and
:class:`~.device.DeviceArray` for buffers. In TVM 0.27 a buffer parameter is a Var of
``BufferType`` and a buffer's data pointer is the call ``tirx.buffer_data(buffer)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgert.passes.gpu_launch.build import Built
from edgert.passes.gpu_launch.device import DeviceArray, DeviceSession, LaunchShape
from edgert.passes.gpu_launch.errors import LaunchArgumentError

LAUNCH_OP = "tirx.call_ffi_kernel"
BUFFER_DATA_OP = "tirx.buffer_data"
DYN_SHARED_TAG = "tirx.use_dyn_shared_memory"
AXES = "xyz"


class HostError(RuntimeError):
    """The host function does something the interpreter does not model, or fails an
    assert."""


def is_var(expr) -> bool:
    return type(expr).__name__ == "Var"


def constant_value(expr):
    """The Python value of a TIR constant (IntImm, FloatImm; bool for a bool), else None."""
    if hasattr(expr, "value") and not hasattr(expr, "args"):
        return bool(expr.value) if str(expr.ty) == "bool" else expr.value
    return None


@dataclass
class Scope:
    """Values of the host function's variables."""

    analyzer: Any
    values: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # hash -> (Var, value)

    @classmethod
    def empty(cls) -> Scope:
        import tvm

        return cls(tvm.sym.Analyzer())

    def bind(self, var, value) -> None:
        """``var = value``: a number (also known to the analyzer) or a DeviceArray."""
        import tvm

        self.values[hash(var)] = (var, value)
        if not isinstance(value, DeviceArray):
            self.analyzer.bind(var, tvm.tirx.const(value, str(var.ty)), allow_override=True)

    def lookup(self, var):
        found = self.values.get(hash(var))
        return found[1] if found is not None and found[0].same_as(var) else None

    def eval(self, expr):
        """A PrimExpr over bound variables -> a Python number, or the DeviceArray of a buffer
        (a buffer Var, or ``tirx.buffer_data(buffer)``)."""
        if isinstance(expr, int | float):
            return expr
        if is_var(expr):
            found = self.lookup(expr)
            if found is not None:
                return found
        if _is_call(expr, BUFFER_DATA_OP):
            found = self.lookup(expr.args[0])
            if not isinstance(found, DeviceArray):
                raise HostError(f"{expr}: not a buffer the host knows")
            return found
        value = constant_value(self.analyzer.simplify(expr))
        if value is None:
            raise HostError(f"cannot evaluate {expr}: it depends on unbound variables")
        return value


def _is_call(expr, op_name: str) -> bool:
    return type(expr).__name__ == "Call" and getattr(expr.op, "name", "") == op_name


@dataclass
class HostInterpreter:
    """Walks a host PrimFunc's body, running each kernel launch on ``session``."""

    built: Built
    session: DeviceSession
    scope: Scope

    def run(self, stmt) -> None:
        kind = type(stmt).__name__
        handler = getattr(self, f"_{kind}", None)
        if handler is None:
            raise HostError(f"host statement {kind} is not supported: {stmt}")
        handler(stmt)

    def _SeqStmt(self, stmt) -> None:
        for s in stmt.seq:
            self.run(s)

    def _Bind(self, stmt) -> None:
        self.scope.bind(stmt.var, self.scope.eval(stmt.value))

    def _DeclBuffer(self, stmt) -> None:
        data = self.scope.eval(stmt.data)
        if not isinstance(data, DeviceArray):
            raise HostError(f"buffer view {stmt.buffer.name} over {stmt.data}: not a buffer")
        self.scope.bind(stmt.buffer, data)

    def _AllocBuffer(self, stmt) -> None:
        buf = stmt.buffer
        if buf.scope() not in ("global", ""):
            raise HostError(f"host allocation {buf.name} in scope {buf.scope()}")
        size = math.prod(int(self.scope.eval(extent)) for extent in buf.shape)
        self.scope.bind(buf, self.session.alloc(str(buf.dtype), size, buf.name))
        if is_var(buf.elem_offset):
            self.scope.bind(buf.elem_offset, 0)

    def _AttrStmt(self, stmt) -> None:
        if getattr(stmt, "body", None) is not None:
            self.run(stmt.body)

    def _IfThenElse(self, stmt) -> None:
        if self.scope.eval(stmt.condition):
            self.run(stmt.then_case)
        elif stmt.else_case is not None:
            self.run(stmt.else_case)

    def _For(self, stmt) -> None:
        start, extent = int(self.scope.eval(stmt.min)), int(self.scope.eval(stmt.extent))
        for i in range(start, start + extent):
            self.scope.bind(stmt.loop_var, i)
            self.run(stmt.body)

    def _AssertStmt(self, stmt) -> None:
        if not self.scope.eval(stmt.condition):  # the arguments break the function's checks
            raise LaunchArgumentError(f"host assert failed: {stmt.condition} "
                                      f"({stmt.message})")

    def _Evaluate(self, stmt) -> None:
        call = stmt.value
        if _is_call(call, LAUNCH_OP):
            self.launch(call)
        elif constant_value(call) is None:  # Evaluate(0) is a no-op
            raise HostError(f"host call {call} is not supported")

    def launch(self, call) -> None:
        """Evaluate a ``tirx.call_ffi_kernel``'s operands and extents, then run it."""
        args = list(call.args)
        kernel = self.built.kernels[str(args[0].value)]
        count = len(kernel.params)
        operands = [self._operand(kernel.name, param, expr)
                    for param, expr in zip(kernel.params, args[1:1 + count])]
        values = [int(self.scope.eval(e)) for e in args[1 + count:]]
        tags = [str(t) for t in call.attrs.launch_params]
        self.session.run(kernel, operands, launch_shape(tags, values))

    def _operand(self, kernel: str, param, expr):
        value = self.scope.eval(expr)
        if param.is_buffer and not isinstance(value, DeviceArray):
            raise HostError(f"{kernel}.{param.name}: {expr} is not a device buffer")
        return value


def launch_shape(tags: list[str], values: list[int]) -> LaunchShape:
    """Grid and block extents from a launch's tags and values (one value per thread tag, in
    order; the dynamic shared memory's bytes last)."""
    grid, block, dyn_shared = [1, 1, 1], [1, 1, 1], 0
    thread_values = iter(values)
    for tag in tags:
        if tag.startswith("blockIdx."):
            grid[AXES.index(tag[-1])] = next(thread_values)
        elif tag.startswith("threadIdx."):
            block[AXES.index(tag[-1])] = next(thread_values)
        elif tag == DYN_SHARED_TAG:
            dyn_shared = values[-1]
    return LaunchShape(tuple(grid), tuple(block), dyn_shared)
