"""NarrowToInt32 (WebGPU: no 64-bit integers): Before/Expected IR, numerics, refusals."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from edgert.errors import EdgertError  # noqa: E402
from edgert.passes.narrow_to_int32 import NarrowToInt32, int64_values  # noqa: E402


@I.ir_module
class Before:
    @R.function
    def main(ids: R.Tensor((1, "q"), "int64"), pos: R.Tensor((1, "q"), "int64"),
             table: R.Tensor((10, 6), "float32")):
        q = T.int64()
        with R.dataflow():
            flat = R.reshape(ids, R.shape([q]))
            # the ONNX importer's Gather negative-index normalisation
            negative = R.less(flat, R.const(0, "int64"))
            dims = R.shape_to_tensor(R.shape([10, 6]))
            dim = R.take(dims, R.const(0, "int64"), axis=0)
            wrapped = R.add(flat, dim)
            index = R.where(negative, wrapped, flat)
            rows = R.take(table, index, axis=0)
            angle = R.astype(pos, "float32")
            top = R.topk(rows, k=2, axis=-1, ret_type="both", largest=True, dtype="int64")
            best = top[1]
            shifted = R.add(best, R.const(100, "int64"))
            out = (rows, angle, shifted)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def main(ids: R.Tensor((1, "q"), "int32"), pos: R.Tensor((1, "q"), "int32"),
             table: R.Tensor((10, 6), "float32")):
        q = T.int64()
        with R.dataflow():
            flat = R.reshape(ids, R.shape([q]))
            rows = R.take(table, flat, axis=0)
            angle = R.astype(pos, "float32")
            top = R.topk(rows, k=2, axis=-1, ret_type="both", largest=True, dtype="int32")
            best = top[1]
            shifted = R.add(best, R.const(100, "int32"))
            out = (rows, angle, shifted)
            R.output(out)
        return out


def test_before_expected():
    after = NarrowToInt32()(Before)
    tvm.ir.assert_structural_equal(after["main"], Expected["main"], map_free_vars=True)
    assert int64_values(Before["main"]) and not int64_values(after["main"])


def _run(mod, *args):
    ex = tvm.compile(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return [t.numpy() for t in vm["main"](*[tvm.runtime.tensor(a) for a in args])]


def test_narrowed_module_computes_the_same():
    ids = np.array([[3, 0, 9, 4]], dtype=np.int64)
    pos = np.array([[7, 8, 9, 10]], dtype=np.int64)
    table = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    want = _run(Before, ids, pos, table)
    got = _run(NarrowToInt32()(Before), ids.astype(np.int32), pos.astype(np.int32), table)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    assert got[2].dtype == np.int32


def test_a_constant_beyond_int32_is_refused():
    @I.ir_module
    class Big:
        @R.function
        def main(x: R.Tensor((4,), "int64")):
            with R.dataflow():
                y = R.add(x, R.const(2**40, "int64"))
                R.output(y)
            return y

    with pytest.raises(EdgertError, match="does not fit in int32"):
        NarrowToInt32()(Big)


def test_what_cannot_be_narrowed_is_named():
    @I.ir_module
    class ArgMax:
        @R.function
        def main(x: R.Tensor((4, 8), "float32")):
            with R.dataflow():
                y = R.argmax(x, axis=1)
                R.output(y)
            return y

    with pytest.raises(EdgertError, match="relax.argmax"):
        NarrowToInt32()(ArgMax)
