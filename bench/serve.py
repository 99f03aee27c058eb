"""Parallel slots: aggregate decode throughput at 1/2/4/8 streams, and a loopback load test.

    python -m bench.serve artifacts/smollm2-135m [--streams 1,2,4,8] [--new-tokens 128]
        [--runs 3] [--load-seconds 60] [--clients 16] [--parallel 4]
        [--json bench/results/serve.json]

Throughput: ``BatchDecoder`` with N sequences (the bench prompts, greedy, ``ignore_eos``),
all prompts read first; then decode steps until each has ``--new-tokens``, one token a step
per sequence (``speculative="off"``): aggregate decode tokens/s = N x new tokens / decode time
(median of ``--runs``), and its ratio to one stream measured in the same run (median of the
per-run ratios). One more row: a single stream with the speculative steps a sequence decoding
alone gets by default.

Load: ``edgert serve --parallel P`` in a process of its own, ``--clients`` threads sending
chat requests (greedy, 16 to 64 tokens, the bench prompts in turn) for ``--load-seconds``.
Every reply is compared with the text the same request gets alone (``Engine.generate`` in
this process, computed before, the engine then closed): equal ("ok"), another prompt's
reply ("mixed_up"), failed or lost ("failed"), or its own reply rounded differently
("divergent": int8-activation artifacts, whose multi-row matmuls and masked attention round
differently from a solo run; an fp32 artifact must show none). The
server's RSS (``VmRSS``, not the peak) is sampled after a warm-up of 20 requests and every 50
requests; drift = the largest later sample minus the first.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import edgert
from bench import common
from edgert.runtime.batch import BatchDecoder, BatchSequence

LENGTHS = [16, 32, 64, 24]  # max_tokens of the load test's requests, in turn


def decode_throughput(engine, streams: int, new_tokens: int, prompts: list[str],
                      speculative: str | None = "off") -> float:
    """Aggregate decode tokens/s of ``streams`` sequences decoded together."""
    decoder = BatchDecoder(engine, slots=streams, prefill_budget=4096, speculative=speculative)
    seqs = [BatchSequence(engine.encode(prompts[i % len(prompts)]), new_tokens,
                          ignore_eos=True) for i in range(streams)]
    for seq in seqs:
        decoder.admit(seq)
    decoder.step()  # every prompt read (one forward), each sequence's first token chosen
    started = time.perf_counter()
    while decoder.active:
        decoder.step()
    elapsed = time.perf_counter() - started
    return streams * (new_tokens - 1) / elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def expected_texts(engine, prompts: list[str]) -> dict[tuple[str, int], str]:
    """What each load-test request gets alone (greedy, plain decoding)."""
    return {(p, n): engine.generate(p, max_new_tokens=n, speculative="off").text
            for p in prompts for n in LENGTHS}


def load_test(artifact: str, expected: dict, seconds: float, clients: int,
              parallel: int) -> dict:
    """The server in its own process, with no ONNX Runtime session left in this one (its
    idle workers would spin against the server's)."""
    import httpx2 as httpx

    requests = list(expected)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "edgert.cli", "serve", artifact, "--port", str(port),
         "--parallel", str(parallel), "--max-queue", str(clients)],
        cwd=common.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not come up")
            time.sleep(0.2)
        return _drive(base, server.pid, requests, expected, seconds, clients)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _drive(base: str, pid: int, requests, expected, seconds: float, clients: int) -> dict:
    import httpx2 as httpx

    order = itertools.cycle(requests)
    lock = threading.Lock()
    done = {"ok": 0, "divergent": 0, "mixed_up": 0, "failed": 0, "tokens": 0}
    others = {}  # text -> the requests whose solo reply it is
    for key, text in expected.items():
        others.setdefault(text, set()).add(key[0])
    samples: list[dict] = []
    stop_at = time.time() + seconds

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while time.time() < stop_at:
                with lock:
                    prompt, n = next(order)
                try:
                    reply = http.post(f"{base}/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": n, "temperature": 0})
                    body = reply.json()
                    ok = reply.status_code == 200
                    text = body["choices"][0]["message"]["content"] if ok else None
                except httpx.HTTPError:
                    ok, text, body = False, None, {}
                with lock:
                    if not ok:
                        done["failed"] += 1
                    elif text == expected[(prompt, n)]:
                        done["ok"] += 1
                    elif others.get(text, {prompt}) - {prompt}:
                        done["mixed_up"] += 1  # another prompt's reply
                    else:
                        done["divergent"] += 1  # its own reply, rounded differently
                    if ok:
                        done["tokens"] += body["usage"]["completion_tokens"]
                    count = done["ok"] + done["divergent"] + done["mixed_up"] + done["failed"]
                    if count == 20 or (count > 20 and count % 50 == 0):
                        samples.append({"requests": count, "rss_mb": round(rss_mb(pid), 1)})

    started = time.time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    rss = [s["rss_mb"] for s in samples]
    return {**done, "seconds": round(elapsed, 1),
            "requests": done["ok"] + done["divergent"] + done["mixed_up"] + done["failed"],
            "tokens_per_s": round(done["tokens"] / elapsed, 1), "rss_samples": samples,
            "rss_drift_mb": round(max(rss) - rss[0], 1) if rss else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engine = edgert.load(args.artifact)
    prompts = [p["prompt"] for p in common.load_prompts()]
    streams = [int(s) for s in args.streams.split(",")]
    runs = {n: [] for n in [*streams, "1, speculative"]}
    for _ in range(args.runs):  # interleaved: noise hits every stream count alike
        for n in streams:
            runs[n].append(decode_throughput(engine, n, args.new_tokens, prompts))
        runs["1, speculative"].append(decode_throughput(engine, 1, args.new_tokens, prompts,
                                                        speculative=None))
    base = runs[streams[0]]
    rows = [{"streams": n, "tokens_per_s": round(common.median(runs[n]), 1),
             "vs_one": round(common.median([r / b for r, b in zip(runs[n], base)]), 2),
             "runs": [round(r, 1) for r in runs[n]]} for n in runs]
    record = {"bench": "serve", "machine": common.machine(), "artifact": Path(args.artifact).name,
              "new_tokens": args.new_tokens, "throughput": rows,
              "command": ("python -m bench.serve " + " ".join(sys.argv[1:]))}
    if args.load_seconds > 0:
        expected = expected_texts(engine, prompts)
        del engine
        gc.collect()
        record["load"] = {"parallel": args.parallel, "clients": args.clients,
                          **load_test(args.artifact, expected, args.load_seconds,
                                      args.clients, args.parallel)}
    common.emit(record, rows, ["streams", "tokens_per_s", "vs_one"], args.json)


if __name__ == "__main__":
    main()
