"""Greedy decode speed: edgert (ONNX Runtime, in-place KV cache) next to transformers generate.

    python -m bench.decode artifacts/smollm2-135m [--prompts 6] [--new-tokens 128] [--runs 3]

Prints a table and one JSON record. edgert runs in this process, transformers afterwards in a
process of its own (edgert's engine closed first), on the same prompt ids; tokens/s are medians
over runs. Also measures per-token decode time at 100 and
4,000 tokens of context: edgert's GroupQueryAttention over the fixed cache vs the portable
graph (Concat of past and new K/V in every layer, the naive layout).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np

import edgert
from bench import common
from edgert.runtime.steps import causal_mask


def bench_edgert(engine, prompts, new_tokens, runs):
    per_run, decode_rates, outputs = [], [], {}
    for _ in range(runs):
        tokens, elapsed, rates = 0, 0.0, []
        for p in prompts:
            t0 = time.perf_counter()
            result = engine.generate(p["prompt"], max_new_tokens=new_tokens)
            elapsed += time.perf_counter() - t0
            tokens += len(result.output_ids)
            rates.append(result.stats["decode_tokens_per_s"])
            outputs[p["prompt"]] = (result.prompt_ids, result.output_ids)
        per_run.append(tokens / elapsed)
        decode_rates.append(common.median(rates))
    return common.median(per_run), common.median(decode_rates), outputs


def decode_ms_at_context(engine, context: int, steps: int = 24) -> float:
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 40000, context).tolist()
    engine.reset()
    engine.prefill_ids(ids)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.decode_token(42)
        times.append(time.perf_counter() - t0)
    return common.median(times) * 1e3


def portable_decode_ms_at_context(engine, context: int, steps: int = 24) -> float:
    """The same step through model.onnx: past K/V passed in, concatenated in every layer."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(engine.path / engine.manifest.graphs["portable"].file))
    decode_ms_at_context(engine, context, steps=1)  # fills the cache with `context` entries
    feeds = {"input_ids": np.array([[42]]), "position_ids": np.array([[context]]),
             "tree_mask": causal_mask(1), "logits_index": np.zeros(1, dtype=np.int64)}
    for i, buf in enumerate(engine.cache.buffers()):
        kind = "key" if i % 2 == 0 else "value"
        feeds[f"past_{kind}_{i // 2}"] = np.ascontiguousarray(buf[:, :, :context])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        session.run(["logits"], feeds)
        times.append(time.perf_counter() - t0)
    return common.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompts", type=int, default=6, help="how many bench prompts")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--contexts", default="100,4000",
                        help="contexts for the per-token decode time ('' to skip)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the record")
    args = parser.parse_args()

    prompts = common.load_prompts(args.prompts)
    engine = edgert.load(args.artifact)
    engine.generate("warm up", max_new_tokens=4)
    e2e, decode, outputs = bench_edgert(engine, prompts, args.new_tokens, args.runs)
    rss_edgert = common.peak_rss_mb()
    rows = [{"engine": "edgert (ort, greedy)", "tok/s": e2e, "decode tok/s": decode,
             "vs transformers": ""}]
    record = {"bench": "decode", "model": engine.manifest.source.get("name") or str(args.artifact),
              "precision": engine.manifest.dtype, "prompts": len(prompts),
              "new_tokens": args.new_tokens, "runs": args.runs, "machine": common.machine(),
              "edgert": {"backend": "ort", "tokens_per_s": e2e, "decode_tokens_per_s": decode,
                         "peak_rss_mb": rss_edgert, "kv_bytes": engine.cache.nbytes}}
    contexts = [int(c) for c in args.contexts.split(",") if c]
    if contexts:
        scaling = {}
        for ctx in contexts:
            scaling[ctx] = {"gqa_inplace_ms": decode_ms_at_context(engine, ctx),
                            "portable_concat_ms": portable_decode_ms_at_context(engine, ctx)}
        record["decode_ms_by_context"] = scaling
    if not args.no_transformers:
        from bench import peers

        ids = [outputs[p["prompt"]][0] for p in prompts]
        del engine  # no idle edgert session beside the peer's process
        gc.collect()
        peer = peers.run_in_own_process(args.artifact, "transformers", ids, args.new_tokens,
                                        args.runs)
        hf = peer["tokens_per_s"]
        same = sum(out == outputs[p["prompt"]][1] for p, out in zip(prompts, peer["outputs"]))
        rows.append({"engine": "transformers generate (fp32)", "tok/s": hf, "decode tok/s": "",
                     "vs transformers": 1.0})
        rows[0]["vs transformers"] = e2e / hf
        record["transformers"] = {"tokens_per_s": hf, "identical_outputs": f"{same}/{len(prompts)}"}
        record["edgert_vs_transformers"] = e2e / hf
    common.emit(record, rows, ["engine", "tok/s", "decode tok/s", "vs transformers"],
                args.json_path)
    if contexts:
        ctx_rows = [{"context": c, "edgert GQA in place (ms/token)": v["gqa_inplace_ms"],
                     "portable Concat graph (ms/token)": v["portable_concat_ms"]}
                    for c, v in record["decode_ms_by_context"].items()]
        print()
        common.print_table(ctx_rows, list(ctx_rows[0]))


if __name__ == "__main__":
    main()
