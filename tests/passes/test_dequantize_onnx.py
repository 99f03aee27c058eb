"""MatMulNBits -> MatMul over dequantized weights, the form TVM's importer takes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgert.model.block_quant import BLOCK, quantize_rtn
from edgert.passes.dequantize_onnx import dequantize_matmul_nbits, dequantized_weight


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


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_weight_is_the_blocks_value(bits):
    weight = np.random.default_rng(bits).standard_normal((40, 96)).astype(np.float32)
    w = quantize_rtn(weight, bits)
    b, scales, zero_points = packed(w)
    np.testing.assert_allclose(dequantized_weight(b, scales, zero_points, 96, 40, bits, BLOCK),
                               w.dequantize(), rtol=0, atol=1e-6)


def graph_with_matmul_nbits(w, bias: bool):
    n, k = w.shape
    b, scales, zero_points = packed(w)
    inits = [numpy_helper.from_array(b, "B"),
             numpy_helper.from_array(scales.astype(np.float16), "S16"),
             numpy_helper.from_array(np.random.default_rng(1).standard_normal(n)
                                     .astype(np.float32), "bias")]
    names = ["x", "B", "S", "", "", "bias" if bias else ""]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "Z"))
        names[3] = "Z"
    while names[-1] == "":
        names.pop()
    nodes = [helper.make_node("Cast", ["S16"], ["S"], to=TensorProto.FLOAT),
             helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=k, N=n,
                              bits=w.bits, block_size=BLOCK, accuracy_level=1, name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, k])],
                              [helper.make_tensor_value_info("y", 1, [2, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("bits, bias", [(4, False), (4, True), (8, True)])
def test_rewritten_graph_computes_what_matmul_nbits_does(bits, bias):
    w = quantize_rtn(np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32),
                     bits)
    model = graph_with_matmul_nbits(w, bias)
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert dequantize_matmul_nbits(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Cast", "MatMul"] + (["Add"] if bias
                                                                         else [])
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
