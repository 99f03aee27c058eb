"""TVM backend vs ONNX Runtime backend on the same artifact: same tokens, and decode speed.

    python bench/backends.py artifacts/smollm2-135m [--new-tokens 64] [--speed-prompts 8]
                             [--runs 3] [--json bench/results/backends.json]

1. Equality: for every bench prompt, greedy output ids of ``backend="tvm"`` (the llvm module
   ``edgert compile``/``edgert tune`` built) against ``backend="ort"``, with Medusa off and on.
2. Speed: greedy decode tokens/s on the first ``--speed-prompts`` prompts, backends
   alternating within each run (so both see the same machine load), median of ``--runs``.
Needs ``edgert compile ARTIFACT --target llvm`` (after ``edgert tune`` for tuned kernels).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import edgert  # noqa: E402


def equality(engines: dict, prompts: list[dict], new_tokens: int, medusa: bool) -> dict:
    same, mismatches = 0, []
    for p in prompts:
        ids = {name: e.generate(p["prompt"], max_new_tokens=new_tokens, medusa=medusa).output_ids
               for name, e in engines.items()}
        if ids["tvm"] == ids["ort"]:
            same += 1
        else:
            mismatches.append(p["prompt"][:60])
    return {"prompts": len(prompts), "identical": same, "mismatches": mismatches}


def speed(engines: dict, prompts: list[dict], new_tokens: int, runs: int) -> dict:
    """Per backend: end-to-end tokens/s (prefill included) and decode tokens/s (the engine's
    stats, prefill excluded), medians over runs."""
    total = {name: [] for name in engines}
    decode = {name: [] for name in engines}
    prefill = {name: [] for name in engines}
    for _ in range(runs):
        for name, engine in engines.items():
            tokens, elapsed, rates, prefills = 0, 0.0, [], []
            for p in prompts:
                t0 = time.perf_counter()
                result = engine.generate(p["prompt"], max_new_tokens=new_tokens, medusa=False)
                elapsed += time.perf_counter() - t0
                tokens += len(result.output_ids)
                rates.append(result.stats["decode_tokens_per_s"])
                prefills.append(result.stats["prefill_ms"])
            total[name].append(tokens / elapsed)
            decode[name].append(common.median(rates))
            prefill[name].append(common.median(prefills))
    return {name: {"end_to_end_tok_s": common.median(total[name]),
                   "decode_tok_s": common.median(decode[name]),
                   "prefill_ms": common.median(prefill[name])} for name in engines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--speed-prompts", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="equality on the first N prompts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    engines = {"ort": edgert.load(args.artifact), "tvm": edgert.load(args.artifact,
                                                                      backend="tvm")}
    prompts = common.load_prompts(args.limit)
    record = {"bench": "backends", "artifact": str(args.artifact), "machine": common.machine(),
              "new_tokens": args.new_tokens,
              "tuned": engines["tvm"].manifest.compiled["llvm"].get("tuned", {})}
    record["greedy"] = equality(engines, prompts, args.new_tokens, medusa=False)
    if engines["ort"].has_medusa:
        record["medusa"] = equality(engines, prompts, args.new_tokens, medusa=True)
    rates = speed(engines, prompts[:args.speed_prompts], args.new_tokens, args.runs)
    record["speed"] = rates
    record["decode_tvm_over_ort"] = rates["tvm"]["decode_tok_s"] / rates["ort"]["decode_tok_s"]
    rows = [{"backend": name, "decode tok/s": rate["decode_tok_s"],
             "end-to-end tok/s": rate["end_to_end_tok_s"], "prefill ms": rate["prefill_ms"],
             "greedy identical": f"{record['greedy']['identical']}/{len(prompts)}",
             "medusa identical": (f"{record['medusa']['identical']}/{len(prompts)}"
                                  if "medusa" in record else "-")}
            for name, rate in rates.items()]
    common.emit(record, rows, ["backend", "decode tok/s", "end-to-end tok/s", "prefill ms",
                               "greedy identical", "medusa identical"], args.json)


if __name__ == "__main__":
    main()
