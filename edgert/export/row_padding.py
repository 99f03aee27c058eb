"""A lone row's attention runs as two rows, inside the graph (int8-activation artifacts).

ONNX Runtime's GroupQueryAttention takes a different path for one query row than for
several: the outputs differ in the last bits (4e-8 on SmolLM2's first layer), and int8
activation quantization turns that into logit differences of ~0.5. A speculative step
verifies several rows, so a plain step must compute its token as a multi-row forward does,
or the speculative modes stop being token-for-token equal to plain greedy decoding.

The runtime used to feed plain steps as two-row forwards, paying for the second row in every
matmul of the step (bench/step_cost.py measures it). This rewrite pads the rows only where the
difference arises: each attention node's query, key and value get an uncommitted copy of a
lone row, its bias a causal row and column for it, its lengths one more entry; its output is
cut back to the real rows. Everything else (the matmuls, the norms, the lm_head) runs one row.
Row 0 of the padded attention equals row 0 of a two-row forward bit for bit (a test checks).

    q = rows fed; extra = min(max(q, 2) - q, capacity - total)   (0 once two rows or no room)
    query/key/value [1,q,*] ─Pad(edge, extra)─> [1,q+extra,*]
    bias [1,1,q,W] ─Pad(-1e9 column)─Pad(0 row)─Slice─> [1,1,q+extra,W+extra]
    seqlens_k, total_sequence_length += extra
    GQA ─> out [1,q+extra,H] ─Slice(0:q)─> out [1,q,H]

The copy's key/value entry lands one slot past the committed ones (the next step overwrites
it), exactly as the runtime's two-row steps did; at the cache's last slot nothing is padded.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgert.export.attention import GQA_BIAS_SLOT
from edgert.export.decoder import MASK_VALUE

PREFIX = "edgert.pad_rows"
MIN_ROWS = 2
# GroupQueryAttention inputs: query, key, value, past_key, past_value, seqlens_k,
# total_sequence_length, cos_cache, sin_cache, position_ids, attention_bias
_QKV, _PAST_KEY, _SEQLENS, _TOTAL = (0, 1, 2), 3, 5, 6
_ROTARY_INPUTS = (7, 8, 9)


class _Builder:
    """Appends the padding's nodes and constants, names under ``PREFIX``."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph, self.nodes = graph, []

    def const(self, name: str, value) -> str:
        full = f"{PREFIX}.{name}"
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{PREFIX}.{name}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _paddable(node: onnx.NodeProto) -> bool:
    """GroupQueryAttention without in-node rotary (its positions would need padding too)."""
    return (node.op_type == "GroupQueryAttention"
            and not any(len(node.input) > i and node.input[i] for i in _ROTARY_INPUTS))


def _row_counts(b: _Builder, past_key: str) -> tuple[str, str, str]:
    """(q, extra, q + extra), int64 [1]; ``extra`` also needs ``total_sequence_length``."""
    q = b.node("Shape", ["input_ids"], "q", start=1, end=2)
    capacity = b.node("Shape", [past_key], "capacity", start=2, end=3)
    total = b.node("Unsqueeze", [b.node("Cast", ["total_sequence_length"], "total64",
                                        to=TensorProto.INT64), b.const("axis0", [0])],
                   "total")
    want = b.node("Sub", [b.node("Max", [q, b.const("min_rows", [MIN_ROWS])], "q_min"), q],
                  "want")
    extra = b.node("Min", [want, b.node("Sub", [capacity, total], "room")], "extra")
    return q, extra, b.node("Add", [q, extra], "rows")


def pad_lone_attention_rows(model: onnx.ModelProto) -> bool:
    """Rewrite ``model`` (in place) so every GroupQueryAttention runs a lone row as two.
    False (and nothing changed) when the graph has no attention this rewrite can pad."""
    graph = model.graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    if not attention or not all(_paddable(node) for node in attention):
        return False
    b = _Builder(graph)
    q, extra, rows = _row_counts(b, attention[0].input[_PAST_KEY])
    extra32 = b.node("Cast", [extra], "extra32", to=TensorProto.INT32)
    lengths = {
        _SEQLENS: b.node("Add", ["seqlens_k", extra32], "seqlens_k"),
        _TOTAL: b.node("Add", ["total_sequence_length",
                               b.node("Squeeze", [extra32], "extra32_scalar")],
                       "total_sequence_length"),
    }
    row_pads = b.node("Concat", [b.const("zeros4", np.zeros(4, np.int64)), extra,
                                 b.const("zero1", np.zeros(1, np.int64))], "row_pads", axis=0)
    zero_start = b.const("zeros2", np.zeros(2, np.int64))
    start, first_rows = b.const("start", [0]), b.const("axis1", [1])
    column = b.const("column_pads", [0, 0, 0, 0, 0, 0, 0, 1])
    row = b.const("row_pads_bias", [0, 0, 0, 0, 0, 0, 1, 0])
    masked, visible = b.const("mask", np.float32(MASK_VALUE)), b.const("visible", np.float32(0))
    width_axes = b.const("bias_axes", [2, 3])
    prefix, padded_bias = b.nodes, {}
    b.nodes = []
    rewritten: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            rewritten.append(node)
            continue
        tag = node.name.strip("/").replace("/", ".") or node.output[0]
        for slot in _QKV:
            if node.input[slot]:
                node.input[slot] = b.node("Pad", [node.input[slot], row_pads],
                                          f"{tag}.in{slot}", mode="edge")
        for slot, name in lengths.items():
            node.input[slot] = name
        bias = node.input[GQA_BIAS_SLOT] if len(node.input) > GQA_BIAS_SLOT else ""
        if bias:
            if bias not in padded_bias:
                width = b.node("Shape", [bias], f"bias{len(padded_bias)}.width", start=3, end=4)
                ends = b.node("Concat", [rows, b.node("Add", [width, extra],
                                                     f"bias{len(padded_bias)}.width2")],
                              f"bias{len(padded_bias)}.ends", axis=0)
                wide = b.node("Pad", [bias, column, masked], f"bias{len(padded_bias)}.wide")
                tall = b.node("Pad", [wide, row, visible], f"bias{len(padded_bias)}.tall")
                padded_bias[bias] = b.node("Slice", [tall, zero_start, ends, width_axes],
                                           f"bias{len(padded_bias)}")
            node.input[GQA_BIAS_SLOT] = padded_bias[bias]
        out = node.output[0]
        node.output[0] = f"{PREFIX}.{tag}.out"
        rewritten.extend(b.nodes)
        b.nodes = []
        rewritten.append(node)
        rewritten.append(helper.make_node("Slice", [node.output[0], start, q, first_rows],
                                          [out], name=f"{PREFIX}.{tag}.cut"))
    del graph.node[:]
    graph.node.extend(prefix + rewritten)
    return True
