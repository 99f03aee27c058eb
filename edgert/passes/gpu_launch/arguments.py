"""Match a call's arguments to a host PrimFunc's parameters.

A buffer parameter is a Var of ``BufferType`` (TVM 0.27) with a dtype and a shape whose
dimensions may be variables (``n = T.int64()``): the first array that has such a dimension
binds it, later ones must agree. A scalar parameter must hold its value exactly (an int32
parameter refuses 2**40). Arrays of another dtype are converted when every value survives the
round trip (int64 indices for an int32 kernel), else refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgert.passes.gpu_launch.device import DeviceArray, DeviceSession
from edgert.passes.gpu_launch.errors import LaunchArgumentError
from edgert.passes.gpu_launch.host import Scope, is_var


@dataclass(frozen=True)
class BoundBuffer:
    """A buffer argument on the device, and the shape its result comes back in."""

    name: str
    device: DeviceArray
    shape: tuple[int, ...]


def param_names(func) -> list[str]:
    """The names ``launch`` takes and returns for a host PrimFunc's parameters: each
    parameter's own name, ``arg<i>`` (its position) where it has none (TVM's IR builder leaves
    buffers unnamed), and positions for all when two share a name."""
    names = [p.name or f"arg{i}" for i, p in enumerate(func.params)]
    if len(set(names)) != len(names):
        names = [f"arg{i}" for i in range(len(names))]
    return names


def ordered_values(func, args) -> list:
    """The arguments in parameter order, from a list or a dict keyed by :func:`param_names`."""
    names = param_names(func)
    if isinstance(args, dict):
        missing = [n for n in names if n not in args]
        unknown = [k for k in args if k not in names]
        if missing or unknown:
            raise LaunchArgumentError(f"arguments missing {missing}, unknown {unknown}; the "
                                      f"function takes {names}")
        return [args[n] for n in names]
    if len(args) != len(names):
        raise LaunchArgumentError(f"{len(names)} arguments expected ({names}), got {len(args)}")
    return list(args)


def fits(value, dtype: str) -> bool:
    """Whether ``value`` is exactly representable in a scalar of ``dtype``."""
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return float(value).is_integer() and info.min <= int(value) <= info.max
    if dtype == "bool":
        return value in (0, 1, True, False)
    return True


def is_buffer_param(param) -> bool:
    return type(param.ty).__name__ == "BufferType"


def bind_arguments(func, args, session: DeviceSession, cast: bool = True
                   ) -> tuple[Scope, list[BoundBuffer]]:
    """A scope with every parameter bound (scalars, shape variables, uploaded buffers), and
    the buffers in parameter order."""
    scope = Scope.empty()
    buffers = []
    for param, name, value in zip(func.params, param_names(func), ordered_values(func, args)):
        if not is_buffer_param(param):
            bind_scalar(scope, param, name, value)
            continue
        array = as_buffer_array(param, name, value, cast)
        bind_shape(scope, param, name, array.shape)
        if param.strides is not None and len(param.strides):
            raise LaunchArgumentError(f"{name}: strided buffers are not supported")
        if is_var(param.elem_offset):
            scope.bind(param.elem_offset, 0)
        device_array = session.device.upload(array, name)
        scope.bind(param, device_array)
        buffers.append(BoundBuffer(name, device_array, array.shape))
    return scope, buffers


def bind_scalar(scope: Scope, param, name: str, value) -> None:
    dtype = str(param.ty)
    if not fits(value, dtype):
        raise LaunchArgumentError(f"{name} = {value} does not fit its parameter's {dtype}")
    scope.bind(param, value)


def as_buffer_array(param, name: str, value, cast: bool) -> np.ndarray:
    """``value`` as a C-contiguous array of the parameter's dtype and rank."""
    array = np.ascontiguousarray(value)
    want = np.dtype(str(param.dtype))
    if array.dtype != want:
        converted = array.astype(want)
        if not cast or not np.array_equal(converted.astype(array.dtype), array):
            raise LaunchArgumentError(f"{name}: a {array.dtype} array; the kernel takes {want}")
        array = converted
    if array.ndim != len(param.shape):
        raise LaunchArgumentError(f"{name}: rank {array.ndim}; the kernel takes "
                                  f"{len(param.shape)}")
    return array


def bind_shape(scope: Scope, param, name: str, shape: tuple[int, ...]) -> None:
    """Bind the parameter's free dimension variables from ``shape``, then check every
    dimension against it."""
    dims = list(param.shape)
    for dim, extent in zip(dims, shape):
        if is_var(dim) and scope.lookup(dim) is None:
            if not fits(extent, str(dim.ty)):
                raise LaunchArgumentError(f"{name}: {dim} = {extent} does not fit {dim.ty}")
            scope.bind(dim, int(extent))
    got = [scope.eval(dim) for dim in dims]
    if got != list(shape):
        raise LaunchArgumentError(f"{name}: shape {tuple(shape)}; the kernel takes {dims} = "
                                  f"{tuple(got)} here")
