"""Needle in a haystack, scored by the passcode's log-probability instead of exact retrieval.

    python -m bench.niah_logprob ARTIFACT [--modes dense,dhsa] [--context 8192]
                                 [--depths 0,10,...,100] [--needles 3] [--json out.json]

The prompts are bench/niah.py's (same seeds). Each prompt is followed by the start of the
answer, "The secret passcode for the {object} is", and the passcode's tokens are forced one
by one (decode steps over the cache): the score is their summed log-probability, and a needle
counts as found when every one of them is the argmax (on SmolLM2 this agrees with
bench/niah.py's greedy hits). The log-probability moves with every change of the prefill,
so it separates settings that one needle (9 points at 11 depths) cannot: report each mode's
mean difference to dense, over the same prompts. To compare DHSA settings, export artifacts
with ``--dhsa KEY=VALUE`` and run this once per artifact.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench import common, niah


def log_softmax_at(logits: np.ndarray, token: int) -> tuple[float, bool]:
    """(log p(token), whether token is the argmax) from one row of logits."""
    row = logits.astype(np.float64)
    top = row.max()
    return float(row[token] - top - np.log(np.exp(row - top).sum())), bool(row.argmax() == token)


def forced_score(engine, prompt: str, code: str, mode: str, fixed_chunk: int) -> dict:

    obj = prompt.rsplit("passcode for the ", 1)[1].split("?")[0]
    lead = f"The secret passcode for the {obj} is"
    lead_ids = engine.encode(lead, chat=False)
    answer_ids = engine.encode(f"{lead} {code}", chat=False)
    if answer_ids[:len(lead_ids)] != lead_ids:
        raise RuntimeError(f"the tokenizer merges the passcode into the answer's start: {lead!r}")
    ids = engine.encode(prompt) + lead_ids
    engine.reset()
    engine.dhsa_fixed_chunk = fixed_chunk
    out = engine.prefill_ids(ids, sparse=mode != "dense")
    total, found = 0.0, True
    forced = answer_ids[len(lead_ids):]
    for i, token in enumerate(forced):
        logprob, top = log_softmax_at(out.logits[-1], token)
        total, found = total + logprob, found and top
        if i + 1 < len(forced):
            out = engine.decode_token(token)
    return {"logprob": total, "found": found, "prompt_tokens": len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--modes", default="dense,dhsa")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--depths", default="0,10,20,30,40,50,60,70,80,90,100")
    parser.add_argument("--needles", type=int, default=3)
    parser.add_argument("--fixed-chunk", type=int, default=64)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    import edgert

    engine = edgert.load(args.artifact, verify=False)
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in niah.MODES:
            parser.error(f"--modes takes {', '.join(niah.MODES)}; got {mode!r}")
        if mode != "dense" and engine.dhsa is None:
            parser.error(f"{args.artifact} has no DHSA prefill graph (mode {mode})")
    depths = [float(d) / 100 for d in args.depths.split(",")]
    scores = {mode: [] for mode in modes}
    for j, depth in enumerate(depths):
        for needle in range(args.needles):
            prompt, code = niah.build_prompt(engine, args.context, depth,
                                             niah.needle_seed(args.context, j, needle))
            for mode in modes:
                fixed = args.fixed_chunk if mode == "fixed" else 0
                scores[mode].append({"depth": depth, "needle": needle,
                                     **forced_score(engine, prompt, code, mode, fixed)})
    rows = []
    for mode in modes:
        mine = np.array([s["logprob"] for s in scores[mode]])
        row = {"mode": mode, "found": sum(s["found"] for s in scores[mode]),
               "prompts": len(mine), "mean_logprob": round(float(mine.mean()), 3)}
        if "dense" in scores:
            diff = mine - np.array([s["logprob"] for s in scores["dense"]])
            row.update(vs_dense_mean=round(float(diff.mean()), 3),
                       vs_dense_median=round(float(np.median(diff)), 3))
        rows.append(row)
    record = {"bench": "niah_logprob", "artifact": args.artifact, "context": args.context,
              "dhsa": engine.dhsa.to_dict() if engine.dhsa else None,
              "machine": common.machine(), "rows": rows, "scores": scores}
    common.emit(record, rows, list(rows[0]), args.json_path)


if __name__ == "__main__":
    main()
