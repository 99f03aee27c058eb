"""Medusa decoding speed: edgert plain greedy, Medusa greedy, Medusa typical, and peers.

    python -m bench.medusa artifacts/smollm2-135m [--new-tokens 128] [--runs 3]
                           [--lossless-tokens 256]

The engines run on the same prompts (bench/prompts.json: 32 prompts, chat/code/math/writing)
and the same prompt ids. edgert modes, in this process: median tokens/s over ``--runs`` runs
of the whole set (modes interleaved within each run). Peers, each in a process of its own
started after edgert's engine is closed (a runtime sharing a process or idle spinning
threads with another slows it): transformers generate (``--peer-prompts`` prompts, 1 run: it
is slow) and onnxruntime-genai fp32 (all prompts, ``--runs`` runs). Also checks losslessness
(Medusa greedy ids == plain greedy ids for every prompt at ``--lossless-tokens`` new tokens)
and fixed memory: in a fresh process per length, RSS (``VmRSS``, not the peak) after load
and after generating 100 or 2,000 tokens, and the KV bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import edgert
from bench import common

MODES = {
    "plain greedy": {"medusa": False},
    "medusa greedy": {"medusa": True},
    "medusa typical": {"medusa": True, "temperature": 0.7, "seed": 0, "acceptance": "typical"},
}

def run_modes(engine, prompts, new_tokens, runs):
    per_run = defaultdict(list)
    outputs, accepted, kinds = {}, defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0.0])
    for run in range(runs):
        for mode, kwargs in MODES.items():
            tokens, elapsed = 0, 0.0
            for p in prompts:
                t0 = time.perf_counter()
                r = engine.generate(p["prompt"], max_new_tokens=new_tokens, **kwargs)
                dt = time.perf_counter() - t0
                tokens += len(r.output_ids)
                elapsed += dt
                if run == 0:
                    outputs[(mode, p["prompt"])] = r.output_ids
                    accepted[mode][0] += len(r.output_ids) - 1
                    accepted[mode][1] += r.stats["steps"]
                    kinds[(mode, p["kind"])][0] += len(r.output_ids)
                    kinds[(mode, p["kind"])][1] += dt
            per_run[mode].append(tokens / elapsed)
    return per_run, outputs, accepted, kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompts", type=int, default=None, help="first N prompts (default all)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lossless-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peers", default="transformers,genai")
    parser.add_argument("--peer-prompts", type=int, default=8,
                        help="prompts for the transformers peer (slow)")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()

    prompts = common.load_prompts(args.prompts)
    engine = edgert.load(args.artifact)
    if not engine.has_medusa:
        sys.exit("error: the artifact has no Medusa heads; export it with heads first")
    engine.generate("warm up", max_new_tokens=8)
    per_run, outputs, accepted, kinds = run_modes(engine, prompts, args.new_tokens, args.runs)
    tps = {mode: common.median(v) for mode, v in per_run.items()}
    plain = tps["plain greedy"]
    mismatched = []
    for p in prompts:
        plain_ids = engine.generate(p["prompt"], max_new_tokens=args.lossless_tokens,
                                    medusa=False).output_ids
        medusa_ids = engine.generate(p["prompt"], max_new_tokens=args.lossless_tokens,
                                     medusa=True).output_ids
        if plain_ids != medusa_ids:
            mismatched.append(p["prompt"])
    rows = []
    for mode in MODES:
        done, steps = accepted[mode]
        rows.append({"engine": f"edgert {mode}", "tok/s": tps[mode],
                     "mean accepted": done / max(steps, 1), "vs plain": tps[mode] / plain})
    record = {
        "bench": "medusa", "model": engine.manifest.source.get("name"),
        "precision": engine.manifest.dtype, "backend": "ort", "prompts": len(prompts),
        "new_tokens": args.new_tokens, "runs": args.runs, "machine": common.machine(),
        "tree": {"name": engine.manifest.tree["name"], "nodes": engine.tree.size - 1,
                 "tuned_for": (engine.manifest.tree.get("tuned_for") or {}).get("device")},
        "tokens_per_s": tps, "per_run": per_run,
        "mean_accepted": {m: accepted[m][0] / max(accepted[m][1], 1) for m in MODES},
        "speedup_vs_plain": {m: tps[m] / plain for m in MODES},
        "lossless": {"identical": len(prompts) - len(mismatched), "of": len(prompts),
                     "new_tokens": args.lossless_tokens, "mismatched": mismatched},
        "by_kind": {f"{m}/{k}": kinds[(m, k)][0] / kinds[(m, k)][1]
                    for (m, k) in kinds},
    }
    if args.json_path:  # keep the edgert figures even if a peer fails later
        Path(args.json_path).write_text(json.dumps(record, indent=2) + "\n")
    from bench import peers

    prompt_ids = [engine.encode(p["prompt"]) for p in prompts]
    del engine  # no idle edgert session beside the peers' processes
    gc.collect()
    for name in [p for p in args.peers.split(",") if p]:
        subset = prompts[:args.peer_prompts] if name == "transformers" else prompts
        runs = 1 if name == "transformers" else args.runs
        try:
            peer = peers.run_in_own_process(args.artifact, name, prompt_ids[:len(subset)],
                                            args.new_tokens, runs)
        except Exception as exc:  # a peer that does not install or build is reported, not fatal
            record[f"peer_{name}"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"peer {name} unavailable: {exc}", file=sys.stderr)
            continue
        rate = peer["tokens_per_s"]
        same = sum(out == outputs[("plain greedy", p["prompt"])]
                   for p, out in zip(subset, peer["outputs"]))
        record[f"peer_{name}"] = {"engine": peer["engine"], "tokens_per_s": rate,
                                  "prompts": len(subset), "runs": runs, "process": "own",
                                  "same_output_as_edgert": f"{same}/{len(subset)}"}
        record[f"medusa_vs_{name}"] = tps["medusa greedy"] / rate
        rows.append({"engine": peer["engine"], "tok/s": rate, "mean accepted": 1.0,
                     "vs plain": rate / plain})
    if not args.no_rss:
        record["fixed_memory"] = common.rss_check(args.artifact)
    common.emit(record, rows, ["engine", "tok/s", "mean accepted", "vs plain"], args.json_path)
    print(f"lossless: {record['lossless']['identical']}/{len(prompts)} prompts identical; "
          + ", ".join(f"Medusa greedy vs {k[10:]}: {v:.2f}x" for k, v in record.items()
                      if k.startswith("medusa_vs_")))
    if "fixed_memory" in record:
        fm = record["fixed_memory"]
        print("fixed memory: " + "; ".join(
            f"{n} tokens: kv {v['kv_bytes'] / 2**20:.0f} MiB, RSS {v['rss_after_load_mb']:.0f} "
            f"MB after load, {v['rss_after_mb']:.0f} MB after" for n, v in fm.items()))


if __name__ == "__main__":
    main()
