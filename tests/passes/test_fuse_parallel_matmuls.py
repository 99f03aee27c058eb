"""FuseParallelMatmuls: Before/Expected IR and the fused module computing the same."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from edgert.passes.fuse_parallel_matmuls import FuseParallelMatmuls, parallel_groups  # noqa: E402

RNG = np.random.default_rng(0)
K = 8
Q = tirx.Var("q", "int64")
WQ, WK, WV, WO = (RNG.standard_normal((K, n)).astype(np.float32) for n in (8, 4, 4, 8))


def _before() -> tvm.IRModule:
    """q/k/v projections of x (one group), an output projection of another input (alone)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, Q, K], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.matmul(x, relax.const(WQ)))
            k = bb.emit(relax.op.matmul(x, relax.const(WK)))
            v = bb.emit(relax.op.matmul(x, relax.const(WV)))
            o = bb.emit(relax.op.matmul(relax.op.add(q, q), relax.const(WO)))
            out = bb.emit_output(relax.Tuple([o, k, v]))
        bb.emit_func_output(out)
    return bb.get()


def _expected() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, Q, K], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            fused = bb.emit(relax.op.matmul(x, relax.const(np.concatenate([WQ, WK, WV], 1))))
            q = bb.emit(relax.op.strided_slice(fused, axes=[2], begin=[0], end=[8]))
            k = bb.emit(relax.op.strided_slice(fused, axes=[2], begin=[8], end=[12]))
            v = bb.emit(relax.op.strided_slice(fused, axes=[2], begin=[12], end=[16]))
            o = bb.emit(relax.op.matmul(relax.op.add(q, q), relax.const(WO)))
            out = bb.emit_output(relax.Tuple([o, k, v]))
        bb.emit_func_output(out)
    return bb.get()


def test_groups():
    groups = parallel_groups(_before()["main"])
    assert [len(g) for g in groups] == [3]


def test_before_expected():
    after = FuseParallelMatmuls()(_before())
    tvm.ir.assert_structural_equal(after["main"], _expected()["main"], map_free_vars=True)


def test_fused_module_computes_the_same():
    x = RNG.standard_normal((1, 3, K)).astype(np.float32)

    def run(mod):
        vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
        return [t.numpy() for t in vm["main"](tvm.runtime.tensor(x))]

    for want, got in zip(run(_before()), run(FuseParallelMatmuls()(_before()))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_nothing_to_fuse_leaves_the_module_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, K], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.const(WQ)))
        bb.emit_func_output(y)
    mod = bb.get()
    tvm.ir.assert_structural_equal(FuseParallelMatmuls()(mod), mod)
