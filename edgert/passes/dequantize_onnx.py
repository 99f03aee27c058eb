"""Quantized ONNX graphs for TVM's importer: MatMulNBits -> MatMul over dequantized weights.

TVM's ONNX frontend does not know ``com.microsoft.MatMulNBits``. Before import, every
MatMulNBits node of an artifact graph becomes a standard ``MatMul`` (plus ``Add`` for its
bias) over an fp32 initializer, the block-quantized weight dequantized in NumPy::

    W[n, k] = scale[n, b] * (q[n, k] - zero_point[n, b])      b = k // block_size

with MatMulNBits' own conventions: B [N, K/block, block*bits/8] (4 bits: two values a byte,
low nibble first), scales [N, K/block] or flat, zero points uint8 packed like B or absent
(2^(bits-1)). Its inputs may be computed from initializers (the fp16 scales' Cast); the
constant chains that feed them are evaluated first (Cast, Mul, Add, Sub, Transpose,
Unsqueeze, Reshape over constants). The rest of the graph (the Q4_1 correction matmul, the
quantized embedding's Gather) is standard ONNX and imports as it is.

The compiled module therefore holds fp32 weights: it runs a quantized artifact with the same
numerics as ONNX Runtime at ``--compute fp32``, not its footprint (a dequantizing matmul
kernel is the next step).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

FOLDABLE = {"Cast", "Mul", "Add", "Sub", "Transpose", "Unsqueeze", "Reshape"}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _fold(node: onnx.NodeProto, values: list[np.ndarray]) -> np.ndarray:
    attrs = _attrs(node)
    op = node.op_type
    if op == "Cast":
        return values[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op in ("Mul", "Add", "Sub"):
        a, b = values
        return {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract}[op](a, b).astype(a.dtype)
    if op == "Transpose":
        return np.transpose(values[0], attrs.get("perm"))
    if op == "Unsqueeze":
        return np.expand_dims(values[0], tuple(int(a) for a in values[1]))
    shape = [int(d) if d != 0 else values[0].shape[i] for i, d in enumerate(values[1])]
    return values[0].reshape(shape)  # Reshape


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[..., bytes] uint8 -> [..., count] values (4 bits: low nibble first)."""
    if bits == 8:
        return packed[..., :count]
    pairs = np.stack([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :count]


def dequantized_weight(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                       k: int, n: int, bits: int, block: int) -> np.ndarray:
    """W [N, K] float32 of MatMulNBits' B, scales and zero points."""
    blocks = (k + block - 1) // block
    q = _unpack(b.reshape(n, blocks, -1), bits, block).astype(np.float32)
    scale = scales.reshape(n, blocks).astype(np.float32)
    if zero_points is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), dtype=np.float32)
    elif zero_points.dtype == np.uint8:
        zero = _unpack(zero_points.reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zero = zero_points.reshape(n, blocks).astype(np.float32)
    w = (q - zero[:, :, None]) * scale[:, :, None]
    return w.reshape(n, blocks * block)[:, :k]


def dequantize_matmul_nbits(model: onnx.ModelProto) -> int:
    """Rewrite every MatMulNBits of ``model`` in place (see the module docstring); returns how
    many it rewrote."""
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    folded: dict[str, np.ndarray] = {}
    nodes, rewritten = [], 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type in FOLDABLE and inputs and all(n in constants for n in inputs):
            value = _fold(node, [constants[n] for n in node.input if n])
            constants[node.output[0]] = folded[node.output[0]] = value
            nodes.append(node)
            continue
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = _attrs(node)
        args = list(node.input) + [""] * (6 - len(node.input))
        x, b, scales, zero_points, _, bias = args
        weight = dequantized_weight(constants[b], constants[scales],
                                    constants.get(zero_points) if zero_points else None,
                                    attrs["K"], attrs["N"], attrs.get("bits", 4),
                                    attrs["block_size"])
        name = f"{node.name or node.output[0]}.dequantized_t"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
        constants[name] = weight.T
        out = node.output[0]
        product = f"{out}/matmul" if bias else out
        nodes.append(helper.make_node("MatMul", [x, name], [product], name=node.name))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [out],
                                          name=f"{node.name}/bias"))
        rewritten += 1
    if not rewritten:
        return 0
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return rewritten
