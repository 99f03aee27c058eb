"""edgert's kernels on llvm: untuned vs tuned schedule, next to ONNX Runtime at the same shapes.

    python -m bench.kernel_speed artifacts/smollm2-135m [--json bench/results/kernels.json]

For every tunable workload of the artifact's model (``edgert.passes.tuning.tunable``): the kernel
built with its untuned default knobs, with the best knobs of the artifact's tuning database
(``edgert tune``), and the same computation as an ONNX Runtime graph (MatMul; dense masked
attention for tree attention; dense causal attention for DHSA), all timed warm in this process
(median of repeats, summed over the workload's shapes). With ``--json`` the last line printed
is ``{"kernels": [{"name", "untuned_ms", "tuned_ms", "ort_ms"}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from bench import common
from edgert.artifact.io import load_manifest
from edgert.passes.tuning.database import TuningDatabase
from edgert.passes.tuning.tunable import TuneScope, workloads_for
from edgert.passes.tuning.tuner import LocalDevice

REPEAT = 15


def time_tvm(workload, knobs, target, inputs) -> float:
    import tvm

    device = LocalDevice()
    lib = tvm.tirx.build(tvm.IRModule({"kernel": workload.build(knobs)}), target)
    total = 0.0
    for args in inputs:
        tensors = [device.tensor(a) for a in workload.prepare(knobs, args)]
        timer = lib.time_evaluator("kernel", device.dev, number=3, repeat=REPEAT)
        total += float(np.median(timer(*tensors).results)) * 1e3
    return total


def _session(nodes, inputs, outputs, initializers=()):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "kernel",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(a, n) for n, a in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options)


def _timed(run) -> float:
    run()
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return common.median(times) * 1e3


def ort_matmul(args) -> float:
    from onnx import helper

    x, weight = args[0], args[1]
    sess = _session([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", x)], ["y"],
                    [("W", weight)])
    return _timed(lambda: sess.run(None, {"x": x}))


def _attention_nodes():
    from onnx import helper

    return [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
            helper.make_node("Mul", ["s", "scale"], ["ss"]),
            helper.make_node("Add", ["ss", "mask"], ["sm"]),
            helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["o"])]


def ort_masked_attention(q, keys, values, mask) -> float:
    """softmax(q k^T / sqrt(D) + mask) v with K/V already repeated to the query heads."""
    scale = np.array(1.0 / math.sqrt(q.shape[-1]), np.float32)
    feeds = {"q": q, "k": keys, "v": values, "mask": mask}
    sess = _session(_attention_nodes(), list(feeds.items()), ["o"], [("scale", scale)])
    return _timed(lambda: sess.run(None, feeds))


def ort_tree_attention(args) -> float:
    q, kc, vc, order, past = args[:5]
    n, hq, _ = q.shape
    group = hq // kc.shape[0]
    total = past + n
    keys = np.repeat(kc[:, :total], group, axis=0)[None]
    values = np.repeat(vc[:, :total], group, axis=0)[None]
    pre, end = order[:, 0], order[:, 1]
    tree = (pre[None, :] <= pre[:, None]) & (pre[:, None] < end[None, :])
    visible = np.concatenate([np.ones((n, past), bool), tree], axis=1)
    mask = np.where(visible, 0.0, -1e9).astype(np.float32)[None, None]
    return ort_masked_attention(np.ascontiguousarray(q.transpose(1, 0, 2))[None], keys, values,
                                mask)


def ort_causal_attention(args) -> float:
    q, k, v = args[:3]  # [T,Hq,D], [T,Hkv,D]
    seq, hq, _ = q.shape
    group = hq // k.shape[1]
    keys = np.repeat(k.transpose(1, 0, 2), group, axis=0)[None]
    values = np.repeat(v.transpose(1, 0, 2), group, axis=0)[None]
    mask = np.triu(np.full((seq, seq), -1e9, np.float32), 1)[None, None]
    return ort_masked_attention(np.ascontiguousarray(q.transpose(1, 0, 2))[None], keys, values,
                                mask)


ORT_PEERS = {"matmul": ort_matmul, "tree_attention": ort_tree_attention,
             "dhsa_attention": ort_causal_attention}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from edgert.artifact.tvm_build import build_directory
    from edgert.passes.targets import resolve_target

    manifest = load_manifest(args.artifact)
    _, target = resolve_target("llvm")
    database = TuningDatabase.load(build_directory(args.artifact, "llvm"))
    rng = np.random.default_rng(0)
    rows = []
    for workload in workloads_for(TuneScope.from_manifest(manifest)):
        inputs = workload.inputs(rng)
        best = database.best(workload.name)
        untuned = time_tvm(workload, workload.space[0], target, inputs)
        tuned = (time_tvm(workload, workload.knobs_from(best.knobs), target, inputs)
                 if best else None)
        peer = ORT_PEERS.get(workload.kernel)
        ort_ms = sum(peer(a) for a in inputs) if peer else None
        rows.append({"name": workload.name, "untuned_ms": untuned, "tuned_ms": tuned,
                     "ort_ms": ort_ms, "speedup": untuned / tuned if tuned else None,
                     "knobs": best.knobs if best else None, "shapes": workload.shapes})
    record = {"bench": "kernels", "artifact": str(args.artifact), "machine": common.machine(),
              "kernels": rows}
    common.print_table(rows, ["name", "untuned_ms", "tuned_ms", "ort_ms", "speedup", "shapes"])
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"kernels": [{k: r[k] for k in ("name", "untuned_ms", "tuned_ms",
                                                     "ort_ms")} for r in rows]}))


if __name__ == "__main__":
    main()
