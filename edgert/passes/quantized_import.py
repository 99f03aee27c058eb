"""Block-quantized ONNX graphs into Relax with the weights kept quantized.

TVM's ONNX frontend does not know ``com.microsoft.MatMulNBits``. :func:`take_matmul_nbits`
rewrites, before import, every MatMulNBits of an artifact graph into a standard ``MatMul``
(plus ``Add`` for its bias) against a *placeholder*: a new graph input
``edgert_quantized_<i>`` [K, N] float32, and takes the weight out of the graph as a
:class:`~edgert.passes.tir.quant_matmul.QuantizedWeight` (MatMulNBits' B read as 32-bit words,
its scales, and bias = -scale * zero_point; zero points 2^(bits-1) when absent). Inputs
computed from initializers (the fp16 scales' Cast; the draft layer's rows of lm_head's blocks)
are evaluated first: the constant chains of Cast, Mul, Add, Sub, Transpose, Unsqueeze,
Reshape, Gather.

The export's Q4_1 correction (``+ MatMul(blocksum(x), C)``, C [K/32, N]: the blocks' minimum
plus zero point times scale, ``edgert.export.quantize``) is the bias of the same blocks: when
a MatMulNBits output is added to the correction of its own input, C joins the weight's bias and
the correction matmul leaves the graph. So are the minimum rows of int8-activation artifacts
(``MatMulNBits(Concat(x, blocksum(x)), ..)``, K = K0 + K0/32: the last K0/32 rows multiply
the block sums, edgert.model.block_quant.MinimumRows): their values join the bias of the
blocks they belong to and the matmul reads x.

After import, :func:`bind_quantized_weights` replaces each placeholder parameter of the Relax
function by ``call_tir(edgert_dequantize_<bits>_<K>_<N>, [words, scale, bias])`` over
constants, so the module is self-contained and still imports as plain Relax. The pass
``FuseDequantizeMatmul`` then turns ``matmul(x, dequantize(...))`` into edgert's dequantizing
matmul kernel; a dequantize it leaves (an unsupported shape) is folded to fp32 by
``FoldConstant``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgert.passes.tir.quant_matmul import QuantizedWeight, dequantize_tir, per_word

FOLDABLE = {"Cast", "Mul", "Add", "Sub", "Transpose", "Unsqueeze", "Reshape", "Gather"}
PLACEHOLDER = "edgert_quantized_"
DEQUANTIZE_ATTR = "edgert.dequantize"  # PrimFunc attribute: [bits, block]


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
    if op == "Gather":  # rows of a quantized tensor (the draft's output vocabulary)
        return np.take(values[0], values[1], axis=attrs.get("axis", 0))
    shape = [int(d) if d != 0 else values[0].shape[i] for i, d in enumerate(values[1])]
    return values[0].reshape(shape)  # Reshape


class _Graph:
    """An ONNX graph's constants (initializers and folded chains) and producers."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            inputs = [name for name in node.input if name]
            if node.op_type in FOLDABLE and inputs and all(n in self.constants for n in inputs):
                self.constants[node.output[0]] = _fold(node, [self.constants[n] for n in inputs])
            for out in node.output:
                self.producer[out] = node
            for name in inputs:
                self.readers.setdefault(name, []).append(node)

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def blocksum_of(self, name: str, block: int) -> str | None:
        """x when ``name`` is ReduceSum(Reshape(x, [.., K/block, block]), [-1]), else None."""
        total = self.made_by(name, "ReduceSum")
        if total is None or _attrs(total).get("keepdims", 1) != 0 or len(total.input) < 2:
            return None
        axes = self.constants.get(total.input[1])
        blocks = self.made_by(total.input[0], "Reshape")
        if axes is None or list(axes) != [-1] or blocks is None:
            return None
        shape = self.constants.get(blocks.input[1])
        return blocks.input[0] if shape is not None and int(shape[-1]) == block else None

    def correction(self, node: onnx.NodeProto, weight: QuantizedWeight
                   ) -> tuple[onnx.NodeProto, np.ndarray] | None:
        """(the Add, C [N, K/block]) when ``node``'s only reader adds the correction matmul of
        its own input, ``MatMul(blocksum(x), C)``."""
        readers = self.readers.get(node.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Add":
            return None
        add = readers[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        matmul = self.made_by(other, "MatMul")
        if matmul is None or len(self.readers.get(other, [])) != 1:
            return None
        table = self.constants.get(matmul.input[1])
        if (table is None or table.shape != (weight.k // weight.block, weight.n)
                or self.blocksum_of(matmul.input[0], weight.block) != node.input[0]):
            return None
        return add, table.T.astype(np.float32)

    def minimum_rows(self, node: onnx.NodeProto, weight: QuantizedWeight, k: int
                     ) -> tuple[str, QuantizedWeight] | None:
        """(x, the weight over x) when ``node`` reads ``Concat(x, blocksum(x))`` and its last
        K0/block rows (K = K0 + K0/block) multiply those block sums: each such row's values
        join its block's bias."""
        concat = self.made_by(node.input[0], "Concat")
        if concat is None or len(concat.input) != 2 or k % (weight.block + 1):
            return None
        x, sums = concat.input
        own = k // (weight.block + 1) * weight.block
        if self.blocksum_of(sums, weight.block) != x:
            return None
        blocks = own // weight.block
        rows = weight.dequantize()[own:own + blocks].T  # [N, K0/block]
        words = own // per_word(weight.bits)
        return x, QuantizedWeight(weight.bits, weight.block,
                                  np.ascontiguousarray(weight.words[:, :words]),
                                  np.ascontiguousarray(weight.scale[:, :blocks]),
                                  np.ascontiguousarray(weight.bias[:, :blocks] + rows))


def take_matmul_nbits(model: onnx.ModelProto) -> dict[str, QuantizedWeight]:
    """Rewrite every MatMulNBits of ``model`` in place (see the module docstring); returns
    the weights taken out, by placeholder input name."""
    graph = model.graph
    info = _Graph(graph)
    weights: dict[str, QuantizedWeight] = {}
    replaced: dict[int, list[onnx.NodeProto]] = {}  # node id -> its replacement
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = _attrs(node)
        args = list(node.input) + [""] * (6 - len(node.input))
        x, b, scales, zero_points, _, bias = args
        block = attrs["block_size"]
        stored = -(-attrs["K"] // block) * block  # whole blocks (minimum rows: the last partly)
        weight = QuantizedWeight.from_matmul_nbits(
            info.constants[b], info.constants[scales],
            info.constants.get(zero_points) if zero_points else None,
            stored, attrs["N"], attrs.get("bits", 4), block)
        folded = info.minimum_rows(node, weight, attrs["K"])
        if folded is not None:
            x, weight = folded
        elif stored != attrs["K"]:
            raise ValueError(f"{node.name}: K={attrs['K']} is not a whole number of "
                             f"{block}-value blocks")
        out = node.output[0]
        correction = info.correction(node, weight) if not bias else None
        if correction is not None:
            add, table = correction
            weight = QuantizedWeight(weight.bits, weight.block, weight.words, weight.scale,
                                     weight.bias + table)
            out = add.output[0]
            replaced[id(add)] = []
            replaced[id(info.producer[add.input[1] if add.input[0] == node.output[0]
                                      else add.input[0]])] = []
        name = f"{PLACEHOLDER}{len(weights)}"
        weights[name] = weight
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                         [weight.k, weight.n]))
        product = f"{out}/matmul" if bias else out
        nodes = [helper.make_node("MatMul", [x, name], [product], name=node.name)]
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [out], name=f"{node.name}/bias"))
        replaced[id(node)] = nodes
    if not weights:
        return weights
    nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return weights


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the nodes no graph output depends on, then the initializers nothing reads."""
    needed = {out.name for out in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def bind_quantized_weights(mod, weights: dict[str, QuantizedWeight]):
    """Replace the placeholder parameters of ``mod``'s functions by dequantize calls over
    constants (see the module docstring); the functions keep their other parameters."""
    from tvm import relax

    if not weights:
        return mod
    bb = relax.BlockBuilder(mod)
    kernels = {}
    for weight in weights.values():
        key = (weight.k, weight.n, weight.bits, weight.block)
        if key not in kernels:
            func = dequantize_tir(*key).with_attr(DEQUANTIZE_ATTR, [weight.bits, weight.block])
            kernels[key] = bb.add_func(func, f"edgert_dequantize_{weight.bits}_{weight.k}_"
                                             f"{weight.n}")
    mod = bb.get()
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        placeholders = [p for p in func.params if p.name in weights]
        if not placeholders:
            continue
        bindings = []  # each placeholder becomes a variable bound before the body
        for param in placeholders:
            w = weights[param.name]
            call = relax.call_tir(kernels[(w.k, w.n, w.bits, w.block)],
                                  [relax.const(w.words), relax.const(w.scale),
                                   relax.const(w.bias)],
                                  relax.TensorType([w.k, w.n], "float32"))
            bindings.append(relax.VarBinding(param, call))
        params = [p for p in func.params if p.name not in weights]
        body = relax.SeqExpr([relax.BindingBlock(bindings), *func.body.blocks], func.body.body)
        new = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs,
                             func.span)
        if "num_input" in (func.attrs or {}):
            new = new.with_attr("num_input", len(params))
        mod[gv] = new
    return relax.transform.Normalize()(mod)
