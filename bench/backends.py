"""TVM backend vs ONNX Runtime backend on the same artifact: same tokens, and decode speed.

    python -m bench.backends artifacts/smollm2-135m [--new-tokens 64] [--speed-prompts 8]
                             [--runs 3] [--json bench/results/backends.json]
                             [--no-equality] [--context N] [--speculative MODE]

1. Equality: for every bench prompt, greedy output ids of ``backend="tvm"`` (the llvm module
   ``edgert compile``/``edgert tune`` built) against ``backend="ort"``, with Medusa off and on,
   and in ``--speculative MODE`` (for example draft+lookup) when given: each backend's output
   in that mode against ONNX Runtime's plain greedy output.
2. Speed: greedy decode tokens/s on the first ``--speed-prompts`` prompts, median of
   ``--runs``. Each backend runs in a fresh process of its own, the backends alternating run
   by run (so both see the same machine load): in one process, the thread pool of whichever
   backend ran last keeps spinning and slows the other (ORT measured 2x slower after TVM).
   ``--context N``: the speed prompts are N-token haystack texts instead (decode over a long
   cache: the attention kernels' share grows with the context). With ``--speculative MODE``
   both backends decode in that mode (and the record adds each one's tau).
Needs ``edgert compile ARTIFACT --target llvm`` (after ``edgert tune`` for tuned kernels).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edgert
from bench import common


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


def speculative_equality(engines: dict, prompts: list[dict], new_tokens: int,
                         mode: str) -> dict:
    """Each backend's output in ``mode`` against ONNX Runtime's plain greedy output (lossless
    on both), and whether the two backends took the same steps."""
    lossless, same_steps = dict.fromkeys(engines, 0), 0
    for p in prompts:
        plain = engines["ort"].generate(p["prompt"], max_new_tokens=new_tokens,
                                        speculative="off").output_ids
        out = {name: e.generate(p["prompt"], max_new_tokens=new_tokens, speculative=mode)
               for name, e in engines.items()}
        for name, result in out.items():
            lossless[name] += result.output_ids == plain
        same_steps += out["tvm"].stats["steps"] == out["ort"].stats["steps"]
    return {"mode": mode, "prompts": len(prompts), "identical": lossless["tvm"],
            "ort_identical": lossless["ort"], "same_steps": same_steps}


def speed_in_this_process(artifact: Path, backend: str, prompts: list[dict],
                          new_tokens: int, context: int = 0, speculative: str = "off") -> dict:
    engine = edgert.load(artifact, backend=backend)
    texts = [p["prompt"] for p in prompts]
    if context:  # long prompts: needle-in-a-haystack text of ``context`` tokens
        from niah import build_prompt

        texts = [build_prompt(engine, context, 0.5, seed)[0] for seed in range(len(prompts))]
    engine.generate(prompts[0]["prompt"], max_new_tokens=8, speculative=speculative)  # warm-up
    tokens, elapsed, rates, prefills, steps = 0, 0.0, [], [], 0
    for text in texts:
        t0 = time.perf_counter()
        result = engine.generate(text, max_new_tokens=new_tokens, speculative=speculative)
        elapsed += time.perf_counter() - t0
        tokens += len(result.output_ids)
        steps += result.stats.get("steps", len(result.output_ids))
        rates.append(result.stats["decode_tokens_per_s"])
        prefills.append(result.stats["prefill_ms"])
    return {"end_to_end_tok_s": tokens / elapsed, "decode_tok_s": common.median(rates),
            "prefill_ms": common.median(prefills), "tau": tokens / max(steps, 1)}


def speed(artifact: Path, backends: list[str], speed_prompts: int, new_tokens: int,
          runs: int, context: int = 0, speculative: str = "off") -> dict:
    """Per backend, medians over runs of: end-to-end tokens/s (prefill included), decode
    tokens/s (the engine's stats) and prefill ms; one fresh process per backend and run."""
    samples = {name: [] for name in backends}
    for _ in range(runs):
        for name in backends:
            out = common.run_module("backends", str(Path(artifact).resolve()), "--speed-only", name,
                                    "--speed-prompts", str(speed_prompts),
                                    "--new-tokens", str(new_tokens), "--context", str(context),
                                    "--speculative", speculative)
            out.check_returncode()
            samples[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {name: {key: common.median([s[key] for s in runs_])
                   for key in runs_[0]} for name, runs_ in samples.items()}


def _identical(record: dict, mode: str) -> str:
    return f"{record[mode]['identical']}/{record[mode]['prompts']}" if mode in record else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--speed-prompts", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="equality on the first N prompts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-equality", action="store_true", help="speed only")
    ap.add_argument("--context", type=int, default=0,
                    help="speed with long prompts of this many tokens (haystack text)")
    ap.add_argument("--speculative", default="off",
                    help="also check, and time, this decoding mode (e.g. draft+lookup)")
    ap.add_argument("--speed-only", choices=["ort", "tvm"], default=None,
                    help=argparse.SUPPRESS)  # child process of the speed measurement
    args = ap.parse_args()
    if args.speed_only:
        prompts = common.load_prompts(args.speed_prompts)
        print(json.dumps(speed_in_this_process(args.artifact, args.speed_only, prompts,
                                               args.new_tokens, args.context,
                                               args.speculative)))
        return

    engines = {"ort": edgert.load(args.artifact), "tvm": edgert.load(args.artifact,
                                                                      backend="tvm")}
    prompts = common.load_prompts(args.limit)
    record = {"bench": "backends", "artifact": str(args.artifact), "machine": common.machine(),
              "new_tokens": args.new_tokens,
              "tuned": engines["tvm"].manifest.compiled["llvm"].get("tuned", {})}
    if not args.no_equality:
        record["greedy"] = equality(engines, prompts, args.new_tokens, medusa=False)
        if engines["ort"].has_medusa:
            record["medusa"] = equality(engines, prompts, args.new_tokens, medusa=True)
        if args.speculative not in ("off", "medusa"):
            record["speculative"] = speculative_equality(engines, prompts, args.new_tokens,
                                                         args.speculative)
    del engines  # free both caches before the speed processes start
    rates = speed(args.artifact, ["ort", "tvm"], args.speed_prompts, args.new_tokens, args.runs,
                  args.context, args.speculative)
    record["speed_mode"] = args.speculative
    if args.context:
        record["context"] = args.context
    record["speed"] = rates
    record["decode_tvm_over_ort"] = rates["tvm"]["decode_tok_s"] / rates["ort"]["decode_tok_s"]
    rows = [{"backend": name, "decode tok/s": rate["decode_tok_s"],
             "end-to-end tok/s": rate["end_to_end_tok_s"], "prefill ms": rate["prefill_ms"],
             "tau": rate["tau"], "greedy identical": _identical(record, "greedy"),
             "medusa identical": _identical(record, "medusa"),
             f"{args.speculative} lossless": _lossless(record, name)}
            for name, rate in rates.items()]
    common.emit(record, rows, ["backend", "decode tok/s", "end-to-end tok/s", "prefill ms", "tau",
                               "greedy identical", "medusa identical",
                               f"{args.speculative} lossless"], args.json)


def _lossless(record: dict, backend: str) -> str:
    if "speculative" not in record:
        return "-"
    spec = record["speculative"]
    return f"{spec['identical' if backend == 'tvm' else 'ort_identical']}/{spec['prompts']}"


if __name__ == "__main__":
    main()
