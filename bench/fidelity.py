"""Fidelity of an artifact's weights/compute mode against a reference artifact (fp32).

    python -m bench.fidelity REFERENCE ARTIFACT [ARTIFACT ...] [--prompts 8]
                             [--new-tokens 64] [--ppl-windows 4] [--window 1024]
                             [--json bench/results/fidelity.json]

For each artifact, in a fresh process of its own:
- greedy decoding (plain, no Medusa) of the first ``--prompts`` bench prompts
  (bench/prompts.json), step by step over the Engine's step API, recording at every step the
  margin between the top two logits;
- perplexity on held-out text: Python's own documentation (``pydoc_data.topics``, which no
  bench prompt or head training text comes from), ``--ppl-windows`` windows of ``--window``
  tokens, each scored from an empty cache.

Against the reference: how many prompts give identical ids, the position of the first
difference, and the reference's top-2 margin there (a near tie flips with any change in
summation order: a small margin there says the difference is a tie broken the other way),
and the perplexity ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench import common


def held_out_text() -> str:
    from pydoc_data.topics import topics

    return " ".join(" ".join(topics[k].split()) for k in sorted(topics))


def greedy_with_margins(engine, prompt: str, new_tokens: int) -> tuple[list[int], list[float]]:
    engine.reset()
    out = engine.prefill_ids(engine.encode(prompt))
    ids, margins = [], []
    for _ in range(new_tokens):
        logits = out.logits[-1]
        top2 = np.partition(logits, -2)[-2:]
        token = int(np.argmax(logits))
        ids.append(token)
        margins.append(float(top2.max() - top2.min()))
        if token in engine.eos_ids:
            break
        out = engine.decode_token(token)
    return ids, margins


def worker(artifact: str, prompts: int, new_tokens: int, windows: int, window: int) -> dict:
    import edgert

    engine = edgert.load(artifact, verify=False)
    rows = [greedy_with_margins(engine, p["prompt"], new_tokens)
            for p in common.load_prompts(prompts)]
    ids = engine.encode(held_out_text(), chat=False)
    stride = max(window, (len(ids) - window) // max(windows, 1))
    scored = [engine.logprobs(ids[i * stride:i * stride + window]) for i in range(windows)]
    logprobs = np.concatenate(scored)
    return {"artifact": artifact, "ids": [r[0] for r in rows], "margins": [r[1] for r in rows],
            "perplexity": float(np.exp(-logprobs.mean())), "scored_tokens": int(logprobs.size),
            "quantization": engine.manifest.quantization}


def compare(reference: dict, other: dict) -> dict:
    identical, firsts, tie_margins = 0, [], []
    for ref_ids, ref_margins, ids in zip(reference["ids"], reference["margins"], other["ids"]):
        if ids == ref_ids:
            identical += 1
            continue
        first = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b),
                     min(len(ids), len(ref_ids)))
        firsts.append(first)
        if first < len(ref_margins):
            tie_margins.append(round(ref_margins[first], 4))
    return {"identical": identical, "prompts": len(reference["ids"]),
            "first_difference": firsts, "reference_margin_there": tie_margins,
            "perplexity_ratio": other["perplexity"] / reference["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="the reference first")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.artifacts[0], args.prompts, args.new_tokens,
                                args.ppl_windows, args.window)))
        return
    results = []
    for artifact in args.artifacts:
        proc = common.run_module("fidelity", str(Path(artifact).resolve()), "--worker",
                                 "--prompts", str(args.prompts), "--new-tokens",
                                 str(args.new_tokens), "--ppl-windows", str(args.ppl_windows),
                                 "--window", str(args.window))
        if proc.returncode != 0:
            sys.exit(f"error: {artifact} failed:\n{proc.stderr[-2000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    reference = results[0]
    rows = []
    for result, versus in [(r, compare(reference, r)) for r in results]:
        quant = result["quantization"] or {"weights": "fp32", "compute": "fp32"}
        rows.append({"artifact": Path(result["artifact"]).name, "weights": quant["weights"],
                     "compute": quant["compute"], "perplexity": result["perplexity"],
                     "vs reference": versus["perplexity_ratio"],
                     "identical greedy": f"{versus['identical']}/{versus['prompts']}",
                     "first difference": versus["first_difference"],
                     "ref margin there": versus["reference_margin_there"]})
        result["versus_reference"] = versus
        del result["ids"], result["margins"]
    record = {"bench": "fidelity", "machine": common.machine(), "prompts": args.prompts,
              "new_tokens": args.new_tokens, "window": args.window,
              "windows": args.ppl_windows, "results": results}
    common.emit(record, rows, ["artifact", "weights", "compute", "perplexity", "vs reference",
                               "identical greedy", "first difference", "ref margin there"],
                args.json)


if __name__ == "__main__":
    main()
