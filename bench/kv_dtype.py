"""Should the KV cache be fp16? ONNX Runtime's attention over an fp32 and an fp16 cache, timed.

    python -m bench.kv_dtype artifacts/smollm2-135m [--contexts 300,2000,7000]
        [--json bench/results/kv_dtype.json]

The decode graph's attention is one com.microsoft GroupQueryAttention per layer over the
fixed-capacity cache, bound in place. An fp16 cache halves the KV memory, but the node then
runs in fp16 (query, key, value, bias and cache share one type), so the graph would cast its
fp32 activations in and out around it. This times, at the artifact's attention shape and
capacity, one layer's attention as the graph would run it:

- ``float32``: GroupQueryAttention over fp32 inputs and cache (what edgert exports), its bias
  [1, 1, q, past + q] as the graph builds it;
- ``float16``: Cast(q, k, v, bias) -> GroupQueryAttention over an fp16 cache -> Cast(out),

for 1 and 2 query rows (a plain step of an int8-activation artifact runs its lone row's
attention as two rows) after ``--contexts`` cached tokens, interleaved in rounds (median of
the rounds' per-call means); per token = per layer x the model's layers. With ``--json`` the
last line printed is the record.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from edgert.artifact.io import load_manifest

DTYPES = ("float32", "float16")


def attention_graph(dtype: str, heads: int, kv_heads: int, head_dim: int,
                    capacity: int) -> bytes:
    """One GroupQueryAttention over a [1, Hkv, C, D] cache of ``dtype``; fp32 activations in
    and out (cast around the node for fp16)."""
    from onnx import TensorProto, helper

    fp32, cache_type = TensorProto.FLOAT, {"float32": TensorProto.FLOAT,
                                           "float16": TensorProto.FLOAT16}[dtype]
    cache_shape = [1, kv_heads, capacity, head_dim]
    inputs = [helper.make_tensor_value_info("q", fp32, [1, "s", heads * head_dim]),
              helper.make_tensor_value_info("k", fp32, [1, "s", kv_heads * head_dim]),
              helper.make_tensor_value_info("v", fp32, [1, "s", kv_heads * head_dim]),
              helper.make_tensor_value_info("bias", fp32, [1, 1, "s", "t"]),
              helper.make_tensor_value_info("past_key", cache_type, cache_shape),
              helper.make_tensor_value_info("past_value", cache_type, cache_shape),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    nodes, names = [], {}
    for name in ("q", "k", "v", "bias"):
        if dtype == "float16":
            nodes.append(helper.make_node("Cast", [name], [f"{name}16"], to=cache_type))
            names[name] = f"{name}16"
        else:
            names[name] = name
    attention_out = "out16" if dtype == "float16" else "out"
    nodes.append(helper.make_node(
        "GroupQueryAttention",
        [names["q"], names["k"], names["v"], "past_key", "past_value", "seqlens_k", "total",
         "", "", "", names["bias"]],
        [attention_out, "present_key", "present_value"], domain="com.microsoft",
        num_heads=heads, kv_num_heads=kv_heads))
    if dtype == "float16":
        nodes.append(helper.make_node("Cast", ["out16"], ["out"], to=fp32))
    outputs = [helper.make_tensor_value_info("out", fp32, None),
               helper.make_tensor_value_info("present_key", cache_type, cache_shape),
               helper.make_tensor_value_info("present_value", cache_type, cache_shape)]
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


class AttentionTimer:
    """One dtype's graph in a session, its cache bound in place."""

    def __init__(self, dtype: str, spec, heads: int, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            attention_graph(dtype, heads, spec.num_kv_heads, spec.head_dim, spec.capacity),
            options, providers=["CPUExecutionProvider"])
        self.heads, self.spec = heads, spec
        rng = np.random.default_rng(0)
        self.binding = self.session.io_binding()
        shape = (1, spec.num_kv_heads, spec.capacity, spec.head_dim)
        self.cache = [ort.OrtValue.ortvalue_from_numpy(
            (rng.standard_normal(shape) * 0.5).astype(dtype)) for _ in range(2)]
        for name, value in zip(("key", "value"), self.cache):
            self.binding.bind_ortvalue_input(f"past_{name}", value)
            self.binding.bind_ortvalue_output(f"present_{name}", value)

    def ms_per_call(self, past: int, rows: int, calls: int) -> float:
        b, d, rng = self.binding, self.spec.head_dim, np.random.default_rng(1)
        for name, width in (("q", self.heads * d), ("k", self.spec.num_kv_heads * d),
                            ("v", self.spec.num_kv_heads * d)):
            b.bind_cpu_input(name, rng.standard_normal((1, rows, width)).astype(np.float32))
        b.bind_cpu_input("bias", np.zeros((1, 1, rows, past + rows), np.float32))
        b.bind_cpu_input("seqlens_k", np.array([past + rows - 1], np.int32))
        b.bind_cpu_input("total", np.array(past + rows, np.int32))
        b.bind_output("out", "cpu")
        for _ in range(3):
            self.session.run_with_iobinding(b)
        start = time.perf_counter()
        for _ in range(calls):
            self.session.run_with_iobinding(b)
        return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--contexts", default="300,2000,7000",
                    help="cached tokens before the step (each below the capacity)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100, help="calls per form per round")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all)")
    ap.add_argument("--json")
    args = ap.parse_args()

    manifest = load_manifest(Path(args.artifact))
    spec, config = manifest.kv_cache, manifest.config
    contexts = [int(c) for c in args.contexts.split(",")]
    if max(contexts) + 2 > spec.capacity:
        raise SystemExit(f"--contexts must stay below the capacity {spec.capacity} minus 2")
    timers = {dtype: AttentionTimer(dtype, spec, config.num_attention_heads, args.threads)
              for dtype in DTYPES}
    forms = [(dtype, past, rows) for past in contexts for rows in (1, 2) for dtype in DTYPES]
    times: dict = {form: [] for form in forms}
    for _ in range(args.rounds):
        for dtype, past, rows in forms:
            times[(dtype, past, rows)].append(timers[dtype].ms_per_call(past, rows, args.calls))
    layers = config.num_hidden_layers
    rows_out = []
    for dtype, past, rows in forms:
        ms = common.median(times[(dtype, past, rows)])
        fp32 = common.median(times[("float32", past, rows)])
        rows_out.append({"kv_dtype": dtype, "past": past, "rows": rows, "ms_per_layer": ms,
                         "ms_per_token": ms * layers, "vs_float32": ms / fp32})
    itemsize = {"float32": 4, "float16": 2}
    record = {"bench": "kv_dtype", "artifact": str(args.artifact),
              "shape": {"heads": config.num_attention_heads, "kv_heads": spec.num_kv_heads,
                        "head_dim": spec.head_dim, "capacity": spec.capacity, "layers": layers},
              "kv_mb": {dtype: spec.bytes / 4 * itemsize[dtype] / 2**20 for dtype in DTYPES},
              "rounds": args.rounds, "calls": args.calls, "machine": common.machine(),
              "command": "python -m bench.kv_dtype " + " ".join(sys.argv[1:]),
              "forms": rows_out}
    common.emit(record, rows_out, ["kv_dtype", "past", "rows", "ms_per_layer", "ms_per_token",
                                   "vs_float32"], args.json)


if __name__ == "__main__":
    main()
