"""Fixed memory while decoding: RSS after load and after 100 / 2,000 generated tokens.

    python -m bench.fixed_memory artifacts/smollm2-135m [--speculative MODE] [--temperature T]
                                 [--json bench/results/fixed_memory.json]

Each length in a fresh process (``bench.common.rss_check``): ``VmRSS`` (not the peak) after
loading and a warm-up request, then after generating that many tokens (``ignore_eos``) in
``--speculative`` (default: the artifact's default mode). Every cache is taken once (the KV
cache at load, the draft layer's by the warm-up's first drafting step), so the two samples
should be within a few MB.
"""

from __future__ import annotations

import argparse

from bench import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--speculative", default="default")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = common.rss_check(args.artifact, args.speculative, args.temperature)
    record = {"bench": "fixed_memory", "artifact": args.artifact, "machine": common.machine(),
              "temperature": args.temperature, "lengths": rows}
    table = [{"tokens": n, "mode": r["speculative"], "RSS after load MB": r["rss_after_load_mb"],
              "RSS after MB": r["rss_after_mb"], "kv MB": r["kv_bytes"] / 2**20}
             for n, r in rows.items()]
    common.emit(record, table, ["tokens", "mode", "RSS after load MB", "RSS after MB", "kv MB"],
                args.json)


if __name__ == "__main__":
    main()
