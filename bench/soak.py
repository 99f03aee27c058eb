"""Soak: many requests in one process; resident memory sampled as tokens accumulate.

    python -m bench.soak artifacts/smollm2-135m [--tokens 10000] [--json bench/results/soak.json]

One engine serves requests until ``--tokens`` new tokens were generated: the bench prompts in
turn, cycling through the decoding modes (off, medusa, lookup, medusa+lookup when the artifact
has heads), greedy and sampled (temperature 0.8, top-p 0.9), 16 to 256 new tokens, and every
tenth request a capacity-edge one: a long haystack prompt with ``max_new_tokens`` filling the
KV cache to its last slot (long prompts take the DHSA prefill). RSS (``VmRSS``, not the peak)
is sampled after load and whenever another 1,000 tokens are done; ``kv_bytes`` must not
change. Reported: RSS after load, at the first 1,000 tokens (arenas warmed), at the end, the
drift from the 1,000-token sample to the largest later one, and the requests' count.
"""

from __future__ import annotations

import argparse
import itertools
import time

import edgert
from bench import common

MODES_WITH_HEADS = ["off", "medusa", "lookup", "medusa+lookup"]
FILLER = ("The quick brown fox jumps over the lazy dog while the committee reviews the "
          "quarterly figures in the small meeting room on the third floor. ")


def capacity_edge(engine, new_tokens: int) -> tuple[str, int]:
    """A raw prompt that leaves exactly ``new_tokens`` free slots in the KV cache."""
    per = len(engine.encode(FILLER, chat=False))
    text = FILLER * max(1, (engine.capacity - new_tokens) // per)
    ids = engine.encode(text, chat=False)
    while len(ids) > engine.capacity - new_tokens:  # trim to fit
        text = text[: int(len(text) * 0.98)]
        ids = engine.encode(text, chat=False)
    return text, engine.capacity - len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=10000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    started = time.time()
    engine = edgert.load(args.artifact)
    kv_bytes = engine.cache.nbytes
    samples = [{"tokens": 0, "rss_mb": common.status_mb("VmRSS")}]
    modes = MODES_WITH_HEADS if engine.has_medusa else ["off", "lookup"]
    prompts = itertools.cycle(p["prompt"] for p in common.load_prompts())
    lengths = itertools.cycle([16, 64, 256, 128, 32])
    done, requests, edges, next_sample = 0, 0, 0, 1000
    while done < args.tokens:
        requests += 1
        mode = modes[requests % len(modes)]
        sampled = requests % 3 == 0
        kwargs = {"temperature": 0.8, "top_p": 0.9, "seed": requests} if sampled else {}
        if requests % 10 == 0:
            text, room = capacity_edge(engine, 24)
            result = engine.generate(text, max_new_tokens=room, chat=False, speculative=mode,
                                     ignore_eos=True, **kwargs)
            edges += 1
        else:
            result = engine.generate(next(prompts), max_new_tokens=next(lengths),
                                     speculative=mode, **kwargs)
        if result.stats["kv_bytes"] != kv_bytes:
            raise SystemExit(f"kv_bytes changed: {kv_bytes} -> {result.stats['kv_bytes']}")
        done += len(result.output_ids)
        while done >= next_sample:
            samples.append({"tokens": done, "rss_mb": common.status_mb("VmRSS")})
            next_sample += 1000
    warm = next(s for s in samples if s["tokens"] >= 1000)["rss_mb"]
    later = [s["rss_mb"] for s in samples if s["tokens"] > 1000] or [warm]
    record = {"bench": "soak", "artifact": args.artifact, "machine": common.machine(),
              "tokens": done, "requests": requests, "capacity_edge_requests": edges,
              "kv_mb": kv_bytes / 2**20, "rss_after_load_mb": samples[0]["rss_mb"],
              "rss_at_1000_mb": warm, "rss_end_mb": samples[-1]["rss_mb"],
              "drift_mb": max(later) - warm, "seconds": round(time.time() - started, 1),
              "samples": samples}
    rows = [{"tokens": s["tokens"], "RSS MB": s["rss_mb"]} for s in samples]
    common.emit(record, rows, ["tokens", "RSS MB"], args.json)
    print(f"drift after warm-up: {record['drift_mb']:.1f} MB (goal <= 10), "
          f"{requests} requests, {edges} at the capacity edge")


if __name__ == "__main__":
    main()
