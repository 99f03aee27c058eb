"""Speculative decoding modes side by side: speed, tokens per step, and losslessness.

    python -m bench.speculative artifacts/smollm2-135m [--new-tokens 128] [--runs 3]
                                [--modes off,medusa,lookup,medusa+lookup] [--limit N]
                                [--json bench/results/speculative.json]

A mode ``MODE@D`` runs MODE with the draft layer drafting D tokens per step (its chain's
length at int8 activations, its tree's depth otherwise: ``engine.draft_depth``), and
``MODE@D.B.K.N`` with the whole draft tree (depth, beam, top-k, node budget), instead of the
artifact's own (``draft.depth``, or the ``draft.tree`` tune-tree wrote), so trees compare in
one run.

Greedy decoding on two prompt sets: bench/prompts.json (32 chat/code/math/writing prompts)
and bench/prompts_copy.json (16 prompts whose answers copy from the prompt: edits, summaries,
code changes). All modes run in this process on one engine, interleaved within each run;
per mode and set: decode tok/s (new tokens after the first over the time after prefill,
summed over the set; median of ``--runs``), tau (mean tokens per verification step), the
ratio to plain decoding in the same run, and the accepted drafted tokens per drafter. Every
mode's output ids must equal plain greedy's on every prompt (``lossless``). Also recorded: the
verification forward's time by tree size (after a 200-token prefix, medians of 15), and with
a draft layer the time of one drafting step (catch-up of one row, then the chain or tree).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict

import edgert
from bench import common
from edgert.speculative.dynamic_tree import DraftTreeParams

SETS = {"chat": "prompts", "copy": "prompts_copy"}


def split_mode(label: str) -> tuple[str, tuple[int, ...] | None]:
    """"draft+lookup@2" -> ("draft+lookup", (2,)): the draft drafts 2 tokens per step;
    "draft+lookup@3.1.3.4" -> the whole draft tree (depth, beam, top-k, budget); a label
    without "@" keeps the artifact's own (None)."""
    mode, _, spec = label.partition("@")
    if not spec:
        return mode, None
    parts = spec.split(".")
    if len(parts) not in (1, 4) or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise SystemExit(f"mode {label!r}: after '@' give the draft depth, or depth.beam.topk."
                         "budget, as positive integers")
    return mode, tuple(int(p) for p in parts)


def run_once(engine, prompt: str, label: str, new_tokens: int) -> dict:
    mode, tree = split_mode(label)
    kept = engine.draft_depth, engine.draft_tree
    if tree is not None:
        params = (DraftTreeParams(*tree) if len(tree) == 4
                  else dataclasses.replace(engine.draft_tree, depth=tree[0]))
        engine.set_draft_tree(params)
    try:
        t0 = time.perf_counter()
        result = engine.generate(prompt, max_new_tokens=new_tokens, speculative=mode)
        elapsed = time.perf_counter() - t0
    finally:
        engine.draft_depth, engine.draft_tree = kept
    return {"ids": result.output_ids, "decode_s": elapsed - result.stats["prefill_ms"] / 1e3,
            "steps": result.stats["steps"],
            "accepted_by": result.stats.get("accepted_by", {})}


def measure_set(engine, prompts: list[dict], modes: list[str], new_tokens: int,
                runs: int) -> dict:
    rates = defaultdict(list)  # mode -> decode tok/s per run
    ratios = defaultdict(list)  # mode -> ratio to plain per run
    first: dict[str, list[dict]] = {}
    for run in range(runs):
        this_run = {}
        for mode in modes:
            results = [run_once(engine, p["prompt"], mode, new_tokens) for p in prompts]
            tokens = sum(len(r["ids"]) - 1 for r in results)
            this_run[mode] = tokens / sum(r["decode_s"] for r in results)
            if run == 0:
                first[mode] = results
        for mode in modes:
            rates[mode].append(this_run[mode])
            ratios[mode].append(this_run[mode] / this_run["off"])
    report = {}
    for mode in modes:
        results = first[mode]
        accepted = defaultdict(int)
        for r in results:
            for name, count in r["accepted_by"].items():
                accepted[name] += count
        report[mode] = {
            "decode_tok_s": common.median(rates[mode]),
            "ratio_to_plain": common.median(ratios[mode]),
            "tau": sum(len(r["ids"]) - 1 for r in results) / max(1, sum(r["steps"]
                                                                        for r in results)),
            "accepted_by": dict(accepted),
            "lossless": sum(r["ids"] == p["ids"] for r, p in zip(results, first["off"])),
            "prompts": len(results),
        }
    return report


def draft_step_ms(engine, repeats: int = 15) -> dict[str, float]:
    """Median time of one drafting step (a one-row catch-up, then the rest): the chain and
    the engine's dynamic tree."""
    import numpy as np

    from edgert.runtime.draft import DraftState

    ids = engine.encode("Write a short paragraph about rivers.")
    engine.reset()
    out = engine.prefill_ids(ids)
    token = int(np.argmax(out.logits[-1]))
    feature = out.features[-1:]
    out_ms = {}
    for name in ("chain", "tree"):
        state = DraftState(engine.backend, engine.draft_depth)
        state.start(ids, token, out.features)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state.propose() if name == "chain" else state.propose_tree(engine.draft_tree)
            times.append(time.perf_counter() - t0)
            state.accept([token], feature)  # one more committed row each time
        out_ms[name] = common.median(times[1:]) * 1e3
    return out_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="off,medusa,lookup,medusa+lookup")
    ap.add_argument("--limit", type=int, default=None, help="the first N prompts of each set")
    ap.add_argument("--rss", action="store_true",
                    help="also check fixed memory in the default mode (greedy, 100 and 2,000 "
                         "tokens, a fresh process each)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "off":
        modes = ["off"] + [m for m in modes if m != "off"]
    engine = edgert.load(args.artifact)
    engine.generate("warm up", max_new_tokens=8, speculative="off")
    from edgert.train.tune_tree import measure_forward_ms

    costs = {"verification_ms": {str(q): ms for q, ms in measure_forward_ms(
        engine, sizes=(1, 2, 3, 5, 7, 9), repeats=15).items()}}
    if engine.has_draft:
        costs["draft_step_ms"] = draft_step_ms(engine)
        costs["draft_tree"] = dataclasses.asdict(engine.draft_tree)
    record = {"bench": "speculative", "artifact": str(args.artifact), **costs,
              "machine": common.machine(), "new_tokens": args.new_tokens, "runs": args.runs,
              "command": "python -m bench.speculative " + " ".join(sys.argv[1:]),
              "sets": {}}
    rows = []
    for name, file in SETS.items():
        prompts = common.load_prompts(args.limit, file)
        report = measure_set(engine, prompts, modes, args.new_tokens, args.runs)
        record["sets"][name] = report
        for mode, r in report.items():
            rows.append({"set": name, "mode": mode, "decode tok/s": r["decode_tok_s"],
                         "x plain": r["ratio_to_plain"], "tau": r["tau"],
                         "accepted by": ", ".join(f"{k} {v}" for k, v in r["accepted_by"].items())
                         or "-", "lossless": f"{r['lossless']}/{r['prompts']}"})
    if args.rss:
        del engine
        record["fixed_memory"] = common.rss_check(args.artifact, temperature=0.0)
    common.emit(record, rows, ["set", "mode", "decode tok/s", "x plain", "tau", "accepted by",
                               "lossless"], args.json)
    print("verification forward ms by tree size:", record["verification_ms"])
    if "draft_step_ms" in record:
        print("draft step ms:", record["draft_step_ms"], "tree:", record["draft_tree"])
    for n, row in record.get("fixed_memory", {}).items():
        print(f"fixed memory, {n} tokens ({row['speculative']}): RSS after load "
              f"{row['rss_after_load_mb']:.1f} MB, after {row['rss_after_mb']:.1f} MB")


if __name__ == "__main__":
    main()
