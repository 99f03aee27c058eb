"""top-p filtering cost per token on real logits: edgert's partial sort against a full sort.

    python -m bench.top_p artifacts/smollm2-135m [--positions 64] [--top-p 0.9]
                          [--json bench/results/top_p.json]

Collects the logits of ``--positions`` greedy decode steps over the bench prompts, then times
``sampling.nucleus`` (argpartition of a head that grows until its mass reaches top_p) and a
stable argsort of the whole vocabulary on each (median of 20 calls per position, then the median
over positions; temperature 0.7). Both must pick the same tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import edgert
from bench import common
from edgert.runtime.sampling import SamplingParams, nucleus


def full_sort(probs: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    return order[cumulative - probs[order] < top_p]


def per_call_ms(func, probs, top_p, calls=20) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        func(probs, top_p)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--positions", type=int, default=64)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engine = edgert.load(args.artifact)
    params = SamplingParams(temperature=0.7, top_p=args.top_p)
    logits = []
    for prompt in common.load_prompts():
        engine.reset()
        out = engine.prefill_ids(engine.encode(prompt["prompt"]))
        for _ in range(8):
            logits.append(out.logits[-1].copy())
            out = engine.decode_token(int(np.argmax(out.logits[-1])))
        if len(logits) >= args.positions:
            break
    rows = {"partial": [], "full": [], "kept": []}
    for row in logits[:args.positions]:
        scaled = row.astype(np.float64) / params.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        kept = nucleus(probs, args.top_p)
        assert np.array_equal(np.sort(kept), np.sort(full_sort(probs, args.top_p)))
        rows["kept"].append(len(kept))
        rows["partial"].append(per_call_ms(nucleus, probs, args.top_p))
        rows["full"].append(per_call_ms(full_sort, probs, args.top_p))
    record = {"bench": "top_p", "artifact": args.artifact, "machine": common.machine(),
              "positions": len(rows["kept"]), "top_p": args.top_p, "temperature": 0.7,
              "partial_ms": common.median(rows["partial"]),
              "full_sort_ms": common.median(rows["full"]),
              "kept_tokens_median": common.median(rows["kept"]),
              "kept_tokens_max": int(max(rows["kept"]))}
    table = [{"method": "nucleus (argpartition head)", "ms per token": record["partial_ms"]},
             {"method": "full stable argsort", "ms per token": record["full_sort_ms"]}]
    common.emit(record, table, ["method", "ms per token"], args.json)


if __name__ == "__main__":
    main()
