"""Prefix reuse in multi-turn chat: time to first token per turn, with and without.

    python -m bench.prefix_reuse artifacts/smollm2-135m [--conversations 4] [--turns 4]
                                 [--new-tokens 64] [--runs 3]
                                 [--json bench/results/prefix_reuse.json]

Each conversation takes its user turns from consecutive bench prompts; every turn sends the
whole history (the chat template over system, user and assistant messages), as an OpenAI
client does. The histories are fixed first (the replies of a run without reuse), so both modes
get the same prompts. Then, per run, the two modes alternate on one engine: ``prefix_reuse``
off (every turn prefills its whole prompt) and on (a turn prefills what it adds to the
previous turn's cache). Reported per turn: prompt tokens, tokens reused, prefill ms (medians
over runs), and how many replies equal the reply without reuse (the decoding mode is the
artifact's default; with int8 activations a reused prefix can round differently).
"""

from __future__ import annotations

import argparse

import edgert
from bench import common


def histories(engine, prompts: list[str], new_tokens: int) -> list[list[dict]]:
    """The message list each turn sends, the replies taken from a run without reuse."""
    engine.prefix_reuse = False
    messages, sent = [], []
    for prompt in prompts:
        messages = [*messages, {"role": "user", "content": prompt}]
        sent.append(messages)
        reply = engine.generate(messages, max_new_tokens=new_tokens)
        messages = [*messages, {"role": "assistant", "content": reply.text}]
    return sent


def run_conversation(engine, turns: list[list[dict]], new_tokens: int, reuse: bool
                     ) -> list[dict]:
    engine.reset()
    engine.prefix_reuse = reuse
    rows = []
    for messages in turns:
        out = engine.generate(messages, max_new_tokens=new_tokens)
        rows.append({"prompt_tokens": len(out.prompt_ids), "reused": out.stats["reused_tokens"],
                     "prefill_ms": out.stats["prefill_ms"], "output": out.output_ids})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engine = edgert.load(args.artifact)
    prompts = [p["prompt"] for p in common.load_prompts()]
    conversations = [histories(engine, prompts[c * args.turns:(c + 1) * args.turns],
                               args.new_tokens) for c in range(args.conversations)]
    runs = {False: [], True: []}  # per run: [conversation][turn] rows
    for _ in range(args.runs):
        for reuse in (False, True):
            runs[reuse].append([run_conversation(engine, turns, args.new_tokens, reuse)
                                for turns in conversations])
    table, per_turn = [], []
    for t in range(args.turns):
        cells = [(c, t) for c in range(args.conversations)]

        def med(reuse, key, cells=cells):
            return common.median([float(sum(run[c][t][key] for c, t in cells))
                                  for run in runs[reuse]]) / len(cells)

        equal = sum(runs[True][0][c][t]["output"] == runs[False][0][c][t]["output"]
                    for c, t in cells)
        row = {"turn": t + 1, "prompt_tokens": med(False, "prompt_tokens"),
               "reused_tokens": med(True, "reused"), "prefill_ms_off": med(False, "prefill_ms"),
               "prefill_ms_on": med(True, "prefill_ms"),
               "replies_equal": f"{equal}/{len(cells)}"}
        row["speedup"] = row["prefill_ms_off"] / row["prefill_ms_on"]
        per_turn.append(row)
        table.append(row)
    record = {"bench": "prefix_reuse", "artifact": args.artifact, "machine": common.machine(),
              "conversations": args.conversations, "turns": args.turns,
              "new_tokens": args.new_tokens, "runs": args.runs,
              "speculative": engine.default_speculative, "per_turn": per_turn}
    common.emit(record, table, ["turn", "prompt_tokens", "reused_tokens", "prefill_ms_off",
                                "prefill_ms_on", "speedup", "replies_equal"], args.json)


if __name__ == "__main__":
    main()
