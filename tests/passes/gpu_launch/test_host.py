"""gpu_launch.host and .arguments: the host PrimFunc interpreted against a recording fake
device (no GPU packages needed): launch extents, scratch shared by kernels, argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.passes.gpu_launch import LaunchArgumentError, build, param_names
from edgert.passes.gpu_launch.arguments import bind_arguments, fits
from edgert.passes.gpu_launch.device import DeviceArray, DeviceSession, LaunchShape
from edgert.passes.gpu_launch.host import HostInterpreter, launch_shape
from tests.passes.gpu_launch import programs


class RecordingDevice:
    """Keeps buffers as NumPy arrays and records launches instead of running them."""

    name = "fake"

    def __init__(self) -> None:
        self.launches: list[tuple[str, LaunchShape, list]] = []

    def upload(self, array: np.ndarray, name: str) -> DeviceArray:
        return DeviceArray(array.copy(), array.dtype, array.size, name)

    def download(self, buf: DeviceArray) -> np.ndarray:
        return buf.handle.copy()

    def run(self, kernel, operands, shape: LaunchShape) -> None:
        self.launches.append((kernel.name, shape, operands))

    def finish(self) -> None:
        pass


@pytest.fixture(scope="module")
def transpose_built():
    return build(programs.transpose_twice(), "opencl")


def interpret(built, args):
    session = DeviceSession(RecordingDevice())
    func = built.entry()
    scope, _ = bind_arguments(func, args, session)
    HostInterpreter(built, session, scope).run(func.body)
    return session.device.launches


def test_launch_extents_and_shared_scratch(transpose_built):
    m, n = 37, 129
    a = np.zeros((m, n), np.float32)
    (first, shape1, ops1), (second, shape2, ops2) = interpret(
        transpose_built, [a, np.zeros((n, m), np.float32)])
    assert (first, second) == ("transpose_twice_kernel", "transpose_twice_kernel_1")
    assert shape1 == LaunchShape((10, 17, 1), (4, 8, 1))  # ceil(37/4), ceil(129/8)
    assert shape2 == LaunchShape((150, 1, 1), (32, 1, 1))  # ceil(37*129/32)
    scratch = [op for op in ops1 if isinstance(op, DeviceArray) and op.scratch]
    assert len(scratch) == 1 and scratch[0].size == m * n
    assert any(op is scratch[0] for op in ops2)  # the second kernel reads the same buffer
    assert np.isnan(scratch[0].handle).all()  # poisoned, not zeroed


def test_launch_shape_reads_tags_in_order():
    shape = launch_shape(["blockIdx.y", "blockIdx.x", "threadIdx.x",
                          "tirx.use_dyn_shared_memory"], [3, 5, 64, 1024])
    assert shape == LaunchShape((5, 3, 1), (64, 1, 1), 1024)
    assert shape.global_size == (320, 3, 1) and not shape.empty
    assert LaunchShape((0, 1, 1)).empty


def test_param_names_fall_back_to_positions():
    from edgert.passes.tir.kv_commit import kv_commit_tir

    assert param_names(programs.vadd()) == ["A", "B", "C", "alpha", "off"]
    # the IR builder's buffers are unnamed; the scalar keeps its name
    assert param_names(kv_commit_tir(2, 2, 8, gpu=True)) == ["arg0", "arg1", "arg2", "length"]


@pytest.mark.parametrize("value, dtype, ok", [
    (2 ** 31 - 1, "int32", True), (2 ** 31, "int32", False), (-1, "uint32", False),
    (2 ** 40, "int64", True), (1.5, "int32", False), (1e30, "float32", True)])
def test_fits(value, dtype, ok):
    assert fits(value, dtype) == ok


@pytest.mark.parametrize("args, match", [
    ({"A": np.zeros((3, 5), np.float32)}, "missing"),
    ([np.zeros((3, 5), np.float32)], "2 arguments expected"),
    ([np.zeros((3, 5), np.float32), np.zeros((4, 3), np.float32)], "shape"),
    ([np.zeros(15, np.float32), np.zeros((5, 3), np.float32)], "rank"),
    ([np.full((3, 5), 0.1), np.zeros((5, 3), np.float32)], "float64 array"),
])
def test_arguments_the_kernel_cannot_take_are_refused(transpose_built, args, match):
    with pytest.raises(LaunchArgumentError, match=match):
        interpret(transpose_built, args)


def test_exact_arrays_of_another_dtype_are_converted(transpose_built):
    launches = interpret(transpose_built, [np.ones((3, 5)), np.zeros((5, 3), np.float32)])
    assert len(launches) == 2


def test_scalar_out_of_range_is_refused():
    built = build(programs.vadd(), "opencl")
    a = np.zeros(8, np.float32)
    with pytest.raises(LaunchArgumentError, match="off = 1099511627776 does not fit"):
        interpret(built, [a, a, a, 1.0, 2 ** 40])
