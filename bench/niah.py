"""Needle in a haystack: dense vs DHSA vs fixed-chunk block-sparse prefill, same budget.

    python -m bench.niah artifacts/smollm2-135m [--contexts 2048,4096,8192]
                         [--depths 0,25,50,75,100] [--runs 3] [--needles 1]

Haystack: real English text (Python's own documentation, ``pydoc_data.topics``). A needle (a
random passcode for a random object) is inserted at each depth (``--needles`` prompts per depth,
other fillers and passcodes); the question asks for it and
an answer counts when the greedy reply contains the passcode. Each (mode, context) runs in a
fresh process so its peak RSS is its own. Prefill latency is the median of ``--runs`` prefills
at 50% depth.

Memory, two figures per mode: ``peak_rss_mb``, the process's peak (model load included: the
three sessions' weights and the KV cache), and ``request_peak_mb``, the largest peak RSS while
serving one request, measured from a peak reset (``/proc/self/clear_refs``) at its start, and
``request_extra_mb``, that peak minus the RSS before the request: what prefill adds.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import resource
import sys
import time
from pathlib import Path

from bench import common

OBJECTS = ["blue lighthouse", "old library", "silver train", "mountain cabin", "red balloon",
           "harbor crane", "glass museum", "desert well", "copper bell", "winter garden"]
QUESTION = "What is the secret passcode for the {obj}? Answer with the number only."
MODES = {"dense": {"dhsa": False}, "dhsa": {"dhsa": True}, "fixed": {"dhsa": True}}
ANSWER_TOKENS = 24  # the model answers in a sentence; digits are single tokens


def haystack_sentences() -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics[k].split()) for k in sorted(topics))
    return [s.strip() + "." for s in text.split(". ") if len(s) > 20]


def build_prompt(engine, context: int, depth: float, seed: int) -> tuple[str, str]:
    """A user message of at most ``context`` tokens with the chat template and the answer
    (as many haystack sentences as fit, found by bisection), and the passcode."""
    rng = random.Random(seed)
    obj = rng.choice(OBJECTS)
    code = str(rng.randint(1000, 9999))
    needle = f" The secret passcode for the {obj} is {code}. "
    question = "\n\n" + QUESTION.format(obj=obj)
    sentences = haystack_sentences()
    start = rng.randrange(len(sentences))
    pool = [sentences[(start + i) % len(sentences)] + " " for i in range(len(sentences))]

    def text_with(n: int) -> str:
        cut = round(n * depth)
        return "".join(pool[:cut]) + needle + "".join(pool[cut:n]) + question

    lo, hi = 0, len(pool)
    while lo < hi:  # the largest n whose prompt fits
        mid = (lo + hi + 1) // 2
        if len(engine.encode(text_with(mid))) + ANSWER_TOKENS <= context:
            lo = mid
        else:
            hi = mid - 1
    return text_with(lo), code


def request_memory(run) -> tuple[object, float, float]:
    """(run(), peak RSS MB during it, that peak minus the RSS before it). Linux: the peak
    (VmHWM) is reset to the current RSS first."""
    before = common.status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    result = run()
    peak = common.status_mb("VmHWM")
    return result, peak, peak - before


def needle_seed(context: int, depth_index: int, needle: int) -> int:
    """The seed of one (depth, needle) prompt; needle 0 keeps the seeds of single-needle runs."""
    return context * 100 + depth_index + 1000 * needle


def worker(artifact: str, mode: str, context: int, depths: list[float], runs: int,
           fixed_chunk: int, needles: int = 1) -> dict:
    import edgert

    engine = edgert.load(artifact, verify=False)
    if mode == "fixed":
        engine.dhsa_fixed_chunk = fixed_chunk
    kwargs = MODES[mode]
    hits, latencies, prompt_tokens, peaks, extras = [], [], [], [], []
    cases = [(j, depth, n) for j, depth in enumerate(depths) for n in range(needles)]
    for j, depth, needle in cases:  # depth-major: hits[j * needles + needle]
        prompt, code = build_prompt(engine, context, depth, seed=needle_seed(context, j, needle))
        r, peak, extra = request_memory(functools.partial(
            engine.generate, prompt, max_new_tokens=ANSWER_TOKENS, **kwargs))
        peaks.append(peak)
        extras.append(extra)
        hits.append(code in r.text)
        prompt_tokens.append(len(r.prompt_ids))
        if abs(depth - 0.5) < 1e-9 and needle == 0:
            latencies.append(r.stats["prefill_ms"])
            for _ in range(runs - 1):
                latencies.append(engine.generate(prompt, max_new_tokens=1,
                                                 **kwargs).stats["prefill_ms"])
    return {"mode": mode, "context": context, "accuracy": sum(hits) / len(hits),
            "hits": hits, "prefill_ms": common.median(latencies) if latencies else None,
            "prompt_tokens": prompt_tokens,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "request_peak_mb": max(peaks), "request_extra_mb": max(extras)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--contexts", default="2048,4096,8192")
    parser.add_argument("--depths", default="0,25,50,75,100")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--needles", type=int, default=1,
                        help="needles (prompts with other fillers and passcodes) per depth; "
                             "one needle is 100/depths points of accuracy")
    parser.add_argument("--modes", default="dense,dhsa,fixed")
    parser.add_argument("--fixed-chunk", type=int, default=64,
                        help="chunk size of the fixed-chunk block-sparse baseline")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "CONTEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    depths = [int(d) / 100 for d in args.depths.split(",")]
    if args.worker:
        mode, context = args.worker
        print(json.dumps(worker(args.artifact, mode, int(context), depths, args.runs,
                                args.fixed_chunk, args.needles)))
        return
    if args.needles < 1:
        sys.exit("error: --needles must be >= 1")
    results = []
    for context in [int(c) for c in args.contexts.split(",")]:
        for mode in args.modes.split(","):
            t0 = time.time()
            artifact = str(Path(args.artifact).resolve())
            proc = common.run_module("niah", artifact, "--depths", args.depths,
                                     "--runs", str(args.runs), "--fixed-chunk",
                                     str(args.fixed_chunk), "--needles", str(args.needles),
                                     "--worker", mode, str(context))
            if proc.returncode != 0:
                sys.exit(f"error: worker {mode}@{context} failed:\n{proc.stderr[-2000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {mode}@{context}: {time.time() - t0:.0f} s", file=sys.stderr)
    import edgert

    manifest = edgert.load(args.artifact, verify=False).manifest
    by = {(r["mode"], r["context"]): r for r in results}
    rows = []
    for r in results:
        dense = by.get(("dense", r["context"]))
        ratio = (r["prefill_ms"] / dense["prefill_ms"]) if dense and dense["prefill_ms"] else None
        rows.append({"context": r["context"], "mode": r["mode"],
                     "accuracy": f"{r['accuracy']:.2f}",
                     "prefill ms": r["prefill_ms"], "vs dense": ratio,
                     "peak RSS MB": r["peak_rss_mb"],
                     "request peak MB": r["request_peak_mb"],
                     "prefill adds MB": r["request_extra_mb"]})
    record = {"bench": "niah", "model": manifest.source.get("name"), "backend": "ort",
              "dhsa": manifest.dhsa, "fixed_chunk": args.fixed_chunk, "depths": depths,
              "needles": args.needles, "runs": args.runs, "machine": common.machine(),
              "results": results}
    common.emit(record, rows, ["context", "mode", "accuracy", "prefill ms", "vs dense",
                               "peak RSS MB", "request peak MB", "prefill adds MB"],
                args.json_path)


if __name__ == "__main__":
    main()
