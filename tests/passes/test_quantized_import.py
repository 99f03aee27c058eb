"""Quantized ONNX graphs into Relax: MatMulNBits -> MatMul against a placeholder, the weight
bound back as a dequantize call, and FuseDequantizeMatmul's kernel in its place."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgert.model.block_quant import BLOCK, minimum_as_rows, quantize_rtn
from edgert.passes.quantized_import import PLACEHOLDER, take_matmul_nbits

K, N = 64, 48
RNG = np.random.default_rng(0)


def packed(w):
    """MatMulNBits' B, scales, zero points (uint8 packed or None) of a BlockQuantized."""
    n, k = w.shape
    q = w.q.reshape(n, k // BLOCK, BLOCK)
    zero_points = w.zero_point
    if w.bits == 4:
        q = (q[:, :, 0::2] | (q[:, :, 1::2] << np.uint8(4))).astype(np.uint8)
        if zero_points is not None:
            zero_points = np.pad(zero_points, ((0, 0), (0, zero_points.shape[1] % 2)))
            zero_points = (zero_points[:, 0::2] | (zero_points[:, 1::2] << np.uint8(4)))
    return q, w.scale, zero_points


def _model(nodes, inits, x_shape, n=N):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, x_shape)],
                              [helper.make_tensor_value_info("y", 1, x_shape[:-1] + [n])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def graph_with_matmul_nbits(w, bias: bool, correction: np.ndarray | None = None,
                            x_shape=(2, K)):
    """y = MatMulNBits(x, w) (+ bias) (+ the export's Q4_1 correction: MatMul(blocksum(x), C))
    with fp16 scales cast in the graph, as the export writes it."""
    n, k = w.shape
    b, scales, zero_points = packed(w)
    inits = [numpy_helper.from_array(b, "B"),
             numpy_helper.from_array(scales.astype(np.float16), "S16"),
             numpy_helper.from_array(RNG.standard_normal(n).astype(np.float32), "bias")]
    names = ["x", "B", "S", "", "", "bias" if bias else ""]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "Z"))
        names[3] = "Z"
    while names[-1] == "":
        names.pop()
    main = "y" if correction is None else "main"
    nodes = [helper.make_node("Cast", ["S16"], ["S"], to=TensorProto.FLOAT),
             helper.make_node("MatMulNBits", names, [main], domain="com.microsoft", K=k, N=n,
                              bits=w.bits, block_size=BLOCK, accuracy_level=1, name="mm")]
    if correction is not None:
        inits += [numpy_helper.from_array(np.array([0] * (len(x_shape) - 1)
                                                    + [k // BLOCK, BLOCK]), "blocks"),
                  numpy_helper.from_array(np.array([-1]), "last"),
                  numpy_helper.from_array(correction, "C")]
        nodes += [helper.make_node("Reshape", ["x", "blocks"], ["xb"]),
                  helper.make_node("ReduceSum", ["xb", "last"], ["sums"], keepdims=0),
                  helper.make_node("MatMul", ["sums", "C"], ["corr"], name="mmCorrection"),
                  helper.make_node("Add", ["main", "corr"], ["y"])]
    return _model(nodes, inits, list(x_shape), n)


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("bits, bias, zero_points", [(4, False, False), (4, True, True),
                                                     (8, True, False)])
def test_placeholder_graph_computes_what_matmul_nbits_does(bits, bias, zero_points):
    w = quantize_rtn(RNG.standard_normal((N, K)).astype(np.float32), bits)
    if not zero_points:
        w = type(w)(w.bits, w.q, w.scale, None, w.source, None)
    model = graph_with_matmul_nbits(w, bias)
    x = RNG.standard_normal((2, K)).astype(np.float32)
    want = run(model, {"x": x})
    weights = take_matmul_nbits(model)
    assert list(weights) == [f"{PLACEHOLDER}0"]
    assert [n.op_type for n in model.graph.node] == ["MatMul"] + (["Add"] if bias else [])
    assert {i.name for i in model.graph.initializer} == ({"bias"} if bias else set())
    onnx.checker.check_model(model)
    got = run(model, {"x": x, f"{PLACEHOLDER}0": weights[f"{PLACEHOLDER}0"].dequantize()})
    np.testing.assert_allclose(got, want, atol=1e-4)


def q4_1_weight():
    """A Q4_1-style weight (d * q + m per block) as the export stores it: MatMulNBits with the
    default zero point 8 and the correction table C = m + 8 d, [K/32, N]."""
    w = quantize_rtn(RNG.standard_normal((N, K)).astype(np.float32), 4)
    d = w.scale.astype(np.float32)
    m = RNG.standard_normal(d.shape).astype(np.float32)
    w = type(w)(4, w.q, w.scale, None, "Q4_1", None)
    q = w.q.astype(np.float32).reshape(N, -1, BLOCK)
    dense = (q * d[:, :, None] + m[:, :, None]).reshape(N, K).T
    return w, np.ascontiguousarray((m + 8 * d).T), dense


def test_the_q4_1_correction_joins_the_block_bias():
    w, table, dense = q4_1_weight()
    model = graph_with_matmul_nbits(w, False, correction=table)
    x = RNG.standard_normal((2, K)).astype(np.float32)
    want = run(model, {"x": x})
    np.testing.assert_allclose(want, x @ dense, atol=1e-4)
    weights = take_matmul_nbits(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]  # no correction, no blocksum
    np.testing.assert_allclose(weights[f"{PLACEHOLDER}0"].dequantize(), dense, atol=1e-5)


def test_a_correction_of_another_input_stays():
    w, table, _ = q4_1_weight()
    model = graph_with_matmul_nbits(w, False, correction=table)
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    model.graph.input.append(helper.make_tensor_value_info("x2", 1, [2, K]))
    reshape.input[0] = "x2"
    take_matmul_nbits(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Reshape", "ReduceSum", "MatMul",
                                                     "Add"]


def graph_with_minimum_rows(folded, x_shape=(2, K), accuracy_level=1):
    """y = MatMulNBits(Concat(x, blocksum(x)), minimum rows), as an int8-compute export
    writes a Q4_1 weight (edgert.export.quantize)."""
    b, scales, zero_points = packed(folded.widened)
    n, k = folded.widened.shape[0], folded.k
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S"),
             numpy_helper.from_array(zero_points, "Z"),
             numpy_helper.from_array(np.array([0] * (len(x_shape) - 1)
                                              + [k // BLOCK, BLOCK]), "blocks"),
             numpy_helper.from_array(np.array([-1]), "last")]
    nodes = [helper.make_node("Reshape", ["x", "blocks"], ["xb"]),
             helper.make_node("ReduceSum", ["xb", "last"], ["sums"], keepdims=0),
             helper.make_node("Concat", ["x", "sums"], ["wide"], axis=-1),
             helper.make_node("MatMulNBits", ["wide", "B", "S", "Z"], ["y"],
                              domain="com.microsoft", K=folded.inputs, N=n, bits=4,
                              block_size=BLOCK, accuracy_level=accuracy_level, name="mm")]
    return _model(nodes, inits, list(x_shape), n)


def minimum_rows_weight():
    """A Q4_1 weight (d * q + m, m fp16) as minimum rows."""
    w = quantize_rtn(RNG.standard_normal((N, K)).astype(np.float32), 4)
    m = RNG.standard_normal(w.scale.shape).astype(np.float16).astype(np.float32)
    return minimum_as_rows(type(w)(4, w.q, w.scale, m, "Q4_1", None))


def test_minimum_rows_join_the_block_bias():
    """The rows that multiply the block sums become the bias of their blocks: the matmul reads
    x, the weight is the minimum rows' effective weight, the output ONNX Runtime's."""
    folded = minimum_rows_weight()
    model = graph_with_minimum_rows(folded)
    x = RNG.standard_normal((2, K)).astype(np.float32)
    want = run(model, {"x": x})
    np.testing.assert_allclose(want, x @ folded.effective().T, atol=1e-4)
    weights = take_matmul_nbits(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    assert model.graph.node[0].input[0] == "x"
    weight = weights[f"{PLACEHOLDER}0"]
    assert weight.k == K
    np.testing.assert_allclose(weight.dequantize(), folded.effective().T, atol=1e-5)
    got = run(model, {"x": x, f"{PLACEHOLDER}0": weight.dequantize()})
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_minimum_rows_of_another_input_are_refused():
    """K not a whole number of blocks but no block sums of its own input: named, not guessed."""
    model = graph_with_minimum_rows(minimum_rows_weight())
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    model.graph.input.append(helper.make_tensor_value_info("x2", 1, [2, K]))
    reshape.input[0] = "x2"
    with pytest.raises(ValueError, match="whole number of 32-value blocks"):
        take_matmul_nbits(model)


@pytest.mark.parametrize("x_shape", [(2, K), (1, 3, K)])
def test_relax_module_runs_the_quantized_kernel(x_shape):
    """Import, bind, FuseDequantizeMatmul, build: the kernel's output equals ONNX Runtime's."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgert.passes.fuse_dequantize_matmul import FuseDequantizeMatmul
    from edgert.passes.quantized_import import bind_quantized_weights

    w, table, _ = q4_1_weight()
    model = graph_with_matmul_nbits(w, False, correction=table, x_shape=x_shape)
    x = RNG.standard_normal(x_shape).astype(np.float32)
    want = run(model, {"x": x})
    weights = take_matmul_nbits(model)
    mod = bind_quantized_weights(from_onnx(model, keep_params_in_input=False), weights)
    assert [p.name for p in mod["main"].params] == ["x"]
    assert mod["main"].attrs["num_input"] == 1
    mod = FuseDequantizeMatmul()(mod)
    names = {gv.name_hint for gv in mod.functions}
    assert "edgert_quant_matmul4_64_48" in names and "edgert_dequantize_4_64_48" not in names
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    with target:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(),
                                        relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), want, atol=1e-4)
