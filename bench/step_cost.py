"""What a plain decode step of an int8-activation artifact spends, by what it computes.

    python -m bench.step_cost artifacts/smollm2-135m [--past 300]
        [--json bench/results/step_cost.json]

Times ONNX Runtime's decode graph (``model.ort.onnx``) alone, one call per step as the engine
binds it (IOBinding, the cache bound in place), at ``--past`` cached tokens, fed one row and
two rows, in up to four variants of the graph, all in interleaved rounds (median of the
rounds' per-call means):

- ``padded``: the artifact's graph. One row is what a plain step runs (the graph pads a lone
  row's attention to two rows, ``min_attention_rows: 2``); two rows is a two-row forward, what
  plain steps ran before the in-graph padding;
- ``unpadded``: the padding removed (edgert.export.row_padding undone). One row is then
  faster but not lossless against speculative steps: what padding costs;
- each again without the Q4_1 minimum (the output is then wrong: what the minimum costs). An
  artifact exported at ``--compute int8`` runs it as minimum rows (each matmul reads
  ``Concat(x, blocksum(x))``; removed: it reads x, its weight cut to x's blocks); an older
  one, or ``--compute fp32``, as the exact correction (the block sums, the ``[K/32, N]`` fp32
  matmuls and their adds; removed).

With ``--json`` the last line printed is the record.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from bench import common
from edgert.artifact.io import load_manifest
from edgert.artifact.manifest import GraphKey
from edgert.export.attention import GQA_BIAS_SLOT
from edgert.export.row_padding import PREFIX

CORRECTION_SUFFIX = ".correction"  # edgert.export.quantize: the Q4_1 minimum's table


def _drop_unread(graph, nodes: list) -> None:
    """``graph``'s nodes become ``nodes`` less every node nothing reads (ONNX Runtime would
    still compute it)."""
    outputs = {out.name for out in graph.output}
    while True:
        read = outputs | {name for node in nodes for name in node.input}
        live = [node for node in nodes if any(out in read for out in node.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del graph.node[:]
    graph.node.extend(nodes)


def without_padding(model) -> int:
    """Undo edgert.export.row_padding in ``model`` (in place): each attention node reads the
    unpadded rows, lengths and bias again and writes its output directly; the nodes undone."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}

    def unpadded(name: str) -> str:
        while name.startswith(PREFIX) and name in producer:
            name = producer[name].input[0]
        return name

    cuts = {node.input[0]: node.output[0] for node in graph.node
            if node.name.startswith(PREFIX) and node.name.endswith(".cut")}
    undone = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.output[0] not in cuts:
            continue
        for slot in (0, 1, 2, GQA_BIAS_SLOT):
            node.input[slot] = unpadded(node.input[slot])
        node.input[5], node.input[6] = "seqlens_k", "total_sequence_length"
        node.output[0] = cuts[node.output[0]]
        undone += 1
    _drop_unread(graph, [node for node in graph.node
                         if not (node.name.startswith(PREFIX) and node.name.endswith(".cut"))])
    return undone


def without_correction(model) -> int:
    """Remove the Q4_1 minimum from ``model`` in place, in either form (see the module doc);
    the matmuls changed."""
    return _without_correction_matmuls(model) + _without_minimum_rows(model)


def _without_minimum_rows(model) -> int:
    """Each MatMulNBits over ``Concat(x, blocksum(x))`` reads x instead, its B, scales and
    zero points cut to x's blocks (new initializers), then every node nothing reads."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    inits = {init.name: init for init in graph.initializer}
    changed = 0
    for node in graph.node:
        concat = producer.get(node.input[0]) if node.op_type == "MatMulNBits" else None
        if concat is None or concat.op_type != "Concat" or not node.output[0]:
            continue
        attrs = {a.name: a for a in node.attribute}
        block = attrs["block_size"].i
        k = attrs["K"].i // (block + 1) * block
        blocks = k // block
        # columns kept of B [N, blocks, 16], scales [N, blocks], zero points (two a byte)
        for slot, width in ((1, blocks), (2, blocks), (3, -(-blocks // 2))):
            source = node.input[slot]
            if source not in inits:  # the scales: Cast(fp16 initializer), cut as fp32
                source = producer[source].input[0]
            array = numpy_helper.to_array(inits[source]).astype(
                np.float32 if slot == 2 else np.uint8)
            name = f"{source}.cut"
            array = array.reshape(array.shape[0], -1) if slot == 2 else array
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(array[:, :width]), name))
            node.input[slot] = name
        node.input[0] = concat.input[0]
        attrs["K"].i = k
        changed += 1
    if changed:
        _drop_unread(graph, list(graph.node))
        read = {name for node in graph.node for name in node.input}
        kept = [init for init in graph.initializer if init.name in read]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return changed


def _without_correction_matmuls(model) -> int:
    """Each ``Add(y, MatMul(blocksum, W.correction))`` becomes ``y``, then every node nothing
    reads is removed; the corrections removed."""
    graph = model.graph
    corrections = {node.output[0] for node in graph.node if node.op_type == "MatMul"
                   and node.input[1].endswith(CORRECTION_SUFFIX)}
    outputs = {out.name for out in graph.output}
    alias, kept = {}, []
    for node in graph.node:
        if node.op_type == "Add" and corrections.intersection(node.input):
            main = next(i for i in node.input if i not in corrections)
            if node.output[0] in outputs:  # a graph output keeps its name
                kept.append(onnx.helper.make_node("Identity", [main], [node.output[0]]))
            else:
                alias[node.output[0]] = main
        else:
            kept.append(node)
    for node in kept:
        node.input[:] = [alias.get(name, name) for name in node.input]
    _drop_unread(graph, kept)
    return len(corrections)


class GraphTimer:
    """One decode graph in a session, its cache bound in place, fed one step at a time."""

    def __init__(self, model_bytes: bytes, manifest, past: int, threads: int,
                 token: int = 1234) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model_bytes, options,
                                            providers=["CPUExecutionProvider"])
        self.past, self.token = past, token
        self.binding = self.session.io_binding()
        spec = manifest.kv_cache
        rng = np.random.default_rng(0)
        self.cache = []
        for name in (i.name for i in self.session.get_inputs()):
            if name.startswith("past_"):
                buffer = (rng.standard_normal((1, spec.num_kv_heads, past + 64, spec.head_dim))
                          * 0.5).astype(np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                self.cache.append(value)
                self.binding.bind_ortvalue_input(name, value)
                self.binding.bind_ortvalue_output(name.replace("past_", "present_"), value)
        self.outputs = [o.name for o in self.session.get_outputs()
                        if not o.name.startswith("present_")]

    def bind(self, rows: int) -> None:
        b, p = self.binding, self.past
        b.bind_cpu_input("input_ids", np.full((1, rows), self.token, dtype=np.int64))
        b.bind_cpu_input("position_ids", np.arange(p, p + rows, dtype=np.int64)[None])
        mask = np.triu(np.full((rows, rows), -1e9, dtype=np.float32), 1)[None, None]
        b.bind_cpu_input("tree_mask", mask)
        b.bind_cpu_input("logits_index", np.zeros(1, dtype=np.int64))
        b.bind_cpu_input("seqlens_k", np.array([p + rows - 1], dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(p + rows, dtype=np.int32))
        for name in self.outputs:
            b.bind_output(name, "cpu")

    def ms_per_call(self, rows: int, calls: int) -> float:
        self.bind(rows)
        for _ in range(3):
            self.session.run_with_iobinding(self.binding)
        start = time.perf_counter()
        for _ in range(calls):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--past", type=int, default=300, help="cached tokens before the step")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=40, help="calls per form per round")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all)")
    ap.add_argument("--json")
    args = ap.parse_args()

    artifact = Path(args.artifact)
    manifest = load_manifest(artifact)
    spec = manifest.graphs[GraphKey.ORT_GQA]
    model = onnx.load(str(artifact / spec.file))  # its weights in memory: no file is written
    variants = {"padded": model.SerializeToString()}
    unpadded = onnx.ModelProto()
    unpadded.CopyFrom(model)
    if without_padding(unpadded):
        variants["unpadded"] = unpadded.SerializeToString()
    removed = 0
    for name in list(variants):
        stripped = onnx.load_from_string(variants[name])
        removed = without_correction(stripped)
        if removed:
            variants[f"{name}, no minimum"] = stripped.SerializeToString()
    del model, unpadded
    graphs = {name: GraphTimer(data, manifest, args.past, args.threads)
              for name, data in variants.items()}
    del variants
    forms = [(graph, rows) for graph in graphs for rows in (1, 2)]
    times: dict = {form: [] for form in forms}
    for _ in range(args.rounds):
        for graph, rows in forms:
            times[(graph, rows)].append(graphs[graph].ms_per_call(rows, args.calls))
    base = common.median(times[("padded", 1)])
    rows = [{"graph": graph, "rows": n, "ms_per_step": common.median(times[(graph, n)]),
             "vs_plain_step": common.median(times[(graph, n)]) / base}
            for graph, n in forms]
    record = {"bench": "step_cost", "artifact": str(artifact), "past": args.past,
              "min_attention_rows": spec.min_attention_rows,
              "quantization": {k: (manifest.quantization or {}).get(k)
                               for k in ("accuracy_level", "block_size")},
              "minimum_removed": removed, "rounds": args.rounds, "calls": args.calls,
              "machine": common.machine(), "forms": rows}
    common.emit(record, rows, ["graph", "rows", "ms_per_step", "vs_plain_step"], args.json)


if __name__ == "__main__":
    main()
