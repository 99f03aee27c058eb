"""PackMatmulWeights and the packed-matmul kernels: Before/Expected IR, numerics vs NumPy."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from edgert.passes.pack_matmul_weights import PackMatmulWeights  # noqa: E402
from edgert.passes.tir.matmul import (  # noqa: E402
    SEARCH_SPACE,
    MatmulKnobs,
    pack_weight,
    packed_matmul_tir,
    packed_take_tir,
)

K, N, VOCAB_ROWS = 24, 48, 5
LLVM = tvm.target.Target({"kind": "llvm", "num-cores": 2})
RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((K, N)).astype(np.float32)


def _build(func, name):
    return tvm.tirx.build(tvm.IRModule({name: func.with_attr("global_symbol", name)}),
                          LLVM)[name]


def test_pack_weight_layout():
    packed = pack_weight(WEIGHT, 16)
    assert packed.shape == (N // 16, K, 16)
    assert packed[2, 5, 3] == WEIGHT[5, 2 * 16 + 3]


@pytest.mark.parametrize("knobs", [MatmulKnobs(8, 1), MatmulKnobs(16, 2), MatmulKnobs(48, 4),
                                   MatmulKnobs(8, 2, 3), MatmulKnobs(12, 4, 2)])
@pytest.mark.parametrize("batch, rows", [(1, 1), (1, 3), (1, 8), (2, 3)])
def test_packed_matmul_matches_numpy(knobs, batch, rows):
    kernel = _build(packed_matmul_tir(K, N, knobs), "mm")
    x = RNG.standard_normal((batch, rows, K)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((batch, rows, N), np.float32))
    kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight(WEIGHT, knobs.bn)), out)
    np.testing.assert_allclose(out.numpy(), x @ WEIGHT, rtol=1e-5, atol=1e-5)


def test_knobs_must_divide_the_width():
    with pytest.raises(ValueError, match="does not divide"):
        packed_matmul_tir(K, N, MatmulKnobs(32, 1))
    with pytest.raises(ValueError, match="does not divide"):
        packed_matmul_tir(K, N, MatmulKnobs(16, 1, 2))  # 3 panels in 2 streams
    assert all(k.bn * k.mb * k.streams <= 128 for k in SEARCH_SPACE)


def test_packed_take_reads_columns():
    kernel = _build(packed_take_tir(K, N, 16), "take")
    ids = np.array([0, 47, 17, 17, 3], dtype=np.int64)
    out = tvm.runtime.tensor(np.zeros((K, len(ids)), np.float32))
    kernel(tvm.runtime.tensor(pack_weight(WEIGHT, 16)), tvm.runtime.tensor(ids), out)
    np.testing.assert_array_equal(out.numpy(), WEIGHT[:, ids])


def before_module():
    q = tirx.Var("q", "int64")
    x = relax.Var("x", relax.TensorType([1, q, K], "float32"))
    ids = relax.Var("ids", relax.TensorType([VOCAB_ROWS], "int64"))
    weight = relax.const(WEIGHT)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, ids]):
        with bb.dataflow():
            embedded = bb.emit(relax.op.take(weight, ids, axis=1))
            y = bb.emit(relax.op.matmul(x, weight))
            gv = bb.emit_output(relax.Tuple([y, embedded]))
        bb.emit_func_output(gv)
    return bb.finalize()


def expected_module(knobs: MatmulKnobs):
    q = tirx.Var("q", "int64")
    x = relax.Var("x", relax.TensorType([1, q, K], "float32"))
    ids = relax.Var("ids", relax.TensorType([VOCAB_ROWS], "int64"))
    packed = relax.const(pack_weight(WEIGHT, knobs.bn))
    bb = relax.BlockBuilder()
    matmul = bb.add_func(packed_matmul_tir(K, N, knobs), f"edgert_matmul_{K}_{N}")
    take = bb.add_func(packed_take_tir(K, N, knobs.bn), f"edgert_take_{K}_{N}")
    with bb.function("main", [x, ids]):
        with bb.dataflow():
            embedded = bb.emit(relax.call_tir(take, [packed, ids],
                                              relax.TensorType([K, VOCAB_ROWS], "float32")))
            y = bb.emit(relax.call_tir(matmul, [x, packed],
                                       relax.TensorType([1, q, N], "float32")))
            gv = bb.emit_output(relax.Tuple([y, embedded]))
        bb.emit_func_output(gv)
    return bb.finalize()


def test_before_expected():
    knobs = MatmulKnobs(16, 2)
    after = relax.transform.Normalize()(PackMatmulWeights(lambda k, n: knobs)(before_module()))
    expected = relax.transform.Normalize()(expected_module(knobs))
    tvm.ir.assert_structural_equal(after["main"], expected["main"], map_free_vars=True)
    assert "relax.matmul" not in after["main"].script()


def test_rewritten_module_matches_the_original():
    x = RNG.standard_normal((1, 3, K)).astype(np.float32)
    ids = np.array([1, 0, 46, 47, 9], dtype=np.int64)
    outputs = []
    for mod in (before_module(), PackMatmulWeights(lambda k, n: MatmulKnobs(8, 4))(
            before_module())):
        vm = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(ids))
        outputs.append([o.numpy() for o in out])
    np.testing.assert_allclose(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outputs[1][1], outputs[0][1])


def test_knobs_that_do_not_fit_fall_back_to_the_default():
    after = PackMatmulWeights(lambda k, n: MatmulKnobs(32, 1))(before_module())
    calls = [b.value for block in after["main"].body.blocks for b in block.bindings
             if isinstance(b.value, relax.Call) and len(b.value.args) > 1
             and isinstance(b.value.args[1], relax.Tuple)]
    shapes = {tuple(arg.value.shape) for call in calls for arg in call.args[1].fields
              if isinstance(arg, tvm.ir.expr.Constant)}
    assert shapes == {(N // 16, K, 16)}  # bn=32 does not divide 48: the default panel width


def test_every_function_is_rewritten_sharing_one_packed_weight():
    """A second entry function (like prefill_dhsa) reading the same weight: both functions
    are rewritten, and they read one packed constant."""
    mod = before_module()
    second = relax.utils.copy_with_new_vars(mod["main"]).with_attr("global_symbol", "second")
    mod["second"] = second
    after = PackMatmulWeights(lambda k, n: MatmulKnobs(16, 2))(mod)

    def constants(func):
        return [arg for block in func.body.blocks for b in block.bindings
                if isinstance(b.value, relax.Call) and len(b.value.args) > 1
                and isinstance(b.value.args[1], relax.Tuple)
                for arg in b.value.args[1].fields if isinstance(arg, tvm.ir.expr.Constant)]

    packed = constants(after["main"]) + constants(after["second"])
    assert len(packed) == 4 and all(c.same_as(packed[0]) for c in packed)
    assert "relax.matmul" not in after["second"].script()
