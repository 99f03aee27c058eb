"""edgert's top-k kernel (numerics vs NumPy, GPU mappings) and the LowerTopK pass."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from edgert.passes.lower_topk import LowerTopK  # noqa: E402
from edgert.passes.tir.topk import topk_reference, topk_tir  # noqa: E402

LLVM = tvm.target.Target("llvm")
RNG = np.random.default_rng(0)


def _build(k, lanes=None, index_dtype="int64"):
    func = topk_tir(k, gpu=False, index_dtype=index_dtype, lanes=lanes)
    return tvm.tirx.build(tvm.IRModule({"edgert_topk": func}), LLVM)["edgert_topk"]


def _run(kernel, x, k, index_dtype="int64"):
    values = tvm.runtime.tensor(np.zeros((x.shape[0], k), np.float32))
    indices = tvm.runtime.tensor(np.zeros((x.shape[0], k), index_dtype))
    kernel(tvm.runtime.tensor(x), values, indices)
    return values.numpy(), indices.numpy()


def _rows(v=101):
    x = RNG.standard_normal((6, v)).astype(np.float32)
    x[1, 10:30] = 4.0  # ties: the lower indices first
    x[2] = -np.inf  # nothing but -inf: indices 0..k-1
    x[3, ::7] = 9.0
    return x


@pytest.mark.parametrize("lanes", [1, 4, 7, 32])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_topk_matches_numpy(lanes, k):
    x = _rows()
    values, indices = _run(_build(k, lanes), x, k)
    want_values, want_indices = topk_reference(x, k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(values, want_values)


def test_int32_indices():
    x = _rows(300)
    _, indices = _run(_build(4, 8, "int32"), x, 4, "int32")
    np.testing.assert_array_equal(indices, topk_reference(x, 4)[1])


@pytest.mark.parametrize("target", [{"kind": "cuda", "arch": "sm_80"}, {"kind": "opencl"},
                                    {"kind": "metal"}, {"kind": "webgpu"}], ids=str)
def test_gpu_mapping_builds(target):
    webgpu = target["kind"] == "webgpu"
    func = topk_tir(4, gpu=True, index_dtype="int32" if webgpu else "int64")
    built = tvm.tirx.build(tvm.IRModule({"edgert_topk": func}),
                           tvm.target.Target(target, host={"kind": "llvm"}))
    source = built.imports[0].inspect_source()
    assert "edgert_topk" in source
    if target["kind"] == "cuda":
        assert "__syncthreads" in source  # the lanes' candidates, shared, then merged
    if webgpu:
        assert "i64" not in source and "workgroupBarrier" in source


@I.ir_module
class Heads:
    @R.function
    def main(logits: R.Tensor((3, "n", 50), "float32")):
        with R.dataflow():
            top = R.topk(logits, k=4, axis=-1, ret_type="both", largest=True, dtype="int64")
            smallest = R.topk(logits, k=2, axis=-1, ret_type="both", largest=False,
                              dtype="int64")
            out = (top[0], top[1], smallest[1])
            R.output(out)
        return out


def _ops(func):
    return [b.value.op.name if isinstance(b.value, relax.Call) else type(b.value).__name__
            for block in func.body.blocks for b in block.bindings]


def test_lower_topk_rewrites_the_largest_last_axis_form():
    after = LowerTopK(gpu=False)(Heads)
    ops = _ops(after["main"])
    assert ops.count("relax.topk") == 1  # the smallest-first one is left to TVM
    assert ops.count("relax.call_tir") == 1
    assert "edgert_topk" in [g.name_hint for g in after.functions]
    assert isinstance(after["edgert_topk"], tvm.tirx.PrimFunc)


def test_lower_topk_computes_what_topk_does():
    x = RNG.standard_normal((3, 5, 50)).astype(np.float32)
    x[0, 1, :20] = 2.0

    def run(mod):
        vm = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())
        return [t.numpy() for t in vm["main"](tvm.runtime.tensor(x))]

    for want, got in zip(run(Heads), run(LowerTopK(gpu=False)(Heads))):
        np.testing.assert_array_equal(got, want)
