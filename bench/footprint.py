"""Footprint next to speed: artifact size, RSS, time to first token, decode tokens/s.

    python -m bench.footprint --edgert fp32=ARTIFACT --edgert q4=ARTIFACT [--genai int4]
                              [--llamacpp GGUF] [--prompts 8] [--new-tokens 128] [--runs 3]
                              [--json bench/results/footprint.json]

Every engine runs in a fresh process per run (so its memory and start-up are its own), on
the same chat prompts (bench/prompts.json), greedy. A worker reports:

- ``files MB``: the artifact directory (edgert), the model directory (onnxruntime-genai),
  the GGUF file (llama.cpp);
- ``load RSS MB``: resident memory once loaded; ``peak RSS MB``: the process's high-water
  mark after the prompts;
- ``first token s``: from the process's start (its creation time) to the first generated
  token of the first prompt: interpreter start, imports, load, prefill;
- ``decode tok/s``: median over the prompts of the decode rate (the first token excluded).

The table shows medians over ``--runs`` runs. edgert runs plain, with Medusa and with
Medusa+lookup (when the artifact has heads), and with draft+lookup (when it has a draft
layer: the default speculative mode of such artifacts). ``edgert run`` itself is measured
too, as a user starts it (plain, Medusa, and the artifact's default mode): the CLI process's
peak RSS (``wait4``) and the time to its first
byte of output, next to the artifact's ``kv_bytes`` (the acceptance line: peak <= kv_bytes +
300 MB).

Peers: onnxruntime-genai int4 built by its own builder from the same weights (block 32,
accuracy level 4, its defaults); llama.cpp through llama-cpp-python on the same GGUF when it
is installed (it builds from source in about 10 minutes: README, "Benchmarks").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def directory_mb(path: Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


# -- workers (one engine, one process) ----------------------------------------------------
def edgert_worker(artifact: str, speculative: str, prompts: list[str], new_tokens: int) -> dict:
    import edgert

    engine = edgert.load(artifact)
    load_rss = common.status_mb("VmRSS")
    first = None
    rates, taus = [], []
    for prompt in prompts:
        stats: dict = {}
        for _ in engine.stream(prompt, max_new_tokens=new_tokens, speculative=speculative,
                               stats=stats):
            if first is None:
                first = since_process_start()
        rates.append(stats["decode_tokens_per_s"])
        taus.append(stats["mean_accepted"])
    row = {"load_rss_mb": load_rss, "first_token_s": first, "decode_tok_s": common.median(rates),
           "peak_rss_mb": common.status_mb("VmHWM"), "kv_mb": engine.cache.nbytes / 2**20}
    if speculative != "off":
        row["mean_accepted"] = common.median(taus)
    return row


def genai_worker(model_dir: str, prompt_ids: list[list[int]], new_tokens: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(model_dir)
    load_rss = common.status_mb("VmRSS")
    first, rates = None, []
    for ids in prompt_ids:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        if first is None:
            first = since_process_start()
        t0, n = time.perf_counter(), 0
        while not generator.is_done() and n < new_tokens - 1:
            generator.generate_next_token()
            n += 1
        if n:
            rates.append(n / (time.perf_counter() - t0))
    return {"load_rss_mb": load_rss, "first_token_s": first, "decode_tok_s": common.median(rates),
            "peak_rss_mb": common.status_mb("VmHWM")}


def llamacpp_worker(gguf: str, prompt_ids: list[list[int]], new_tokens: int) -> dict:
    from llama_cpp import Llama

    # its AMX path segfaults in these VMs (DESIGN.md 8): no extra buffer types
    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=os.cpu_count(), verbose=False,
                use_extra_bufts=False)
    load_rss = common.status_mb("VmRSS")
    first, rates = None, []
    for ids in prompt_ids:
        stream = llm.create_completion(ids, max_tokens=new_tokens, temperature=0.0,
                                       stream=True)
        t0, n = None, 0
        for _ in stream:
            if first is None:
                first = since_process_start()
            if t0 is None:
                t0 = time.perf_counter()
            else:
                n += 1
        if n:
            rates.append(n / (time.perf_counter() - t0))
    return {"load_rss_mb": load_rss, "first_token_s": first, "decode_tok_s": common.median(rates),
            "peak_rss_mb": common.status_mb("VmHWM")}


def edgert_run_cli(artifact: str, prompt: str, new_tokens: int, speculative: str) -> dict:
    """``edgert run`` as a user starts it (``speculative``: "default" for the artifact's
    own mode): first byte of output, peak RSS (wait4)."""
    cli = Path(sys.executable).parent / "edgert"
    mode = [] if speculative == "default" else ["--speculative", speculative]
    t0 = time.time()
    proc = subprocess.Popen([str(cli), "run", artifact, "--prompt", prompt, "--max-new-tokens",
                             str(new_tokens), *mode],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(1)
    first = time.time() - t0
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"edgert run {artifact} exited with status {status}")
    return {"first_byte_s": first, "peak_rss_mb": usage.ru_maxrss / 1024}


# -- driver -------------------------------------------------------------------------------
def run_worker(kind: str, target: str, args, ids_file: Path) -> dict:
    proc = common.run_module("footprint", "--worker", kind, target, "--prompts",
                             str(args.prompts), "--new-tokens", str(args.new_tokens),
                             "--ids", str(ids_file))
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {target} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def chat_ids(args, prompts: list[str]) -> list[list[int]]:
    """The prompts with the model's chat template, as edgert encodes them: the peers get
    these very ids."""
    from edgert.artifact.io import read_manifest
    from edgert.runtime.tokenizer import Tokenizer

    artifact = args.edgert[0].partition("=")[2] if args.edgert else None
    if artifact is None:
        raise SystemExit("error: give at least one --edgert artifact (its tokenizer encodes "
                         "the prompts for every engine)")
    # the tokenizer alone: this process forks the measured ones, and a forked child starts
    # with the parent's resident memory (its ru_maxrss would count a loaded engine)
    tokenizer = Tokenizer(Path(artifact), read_manifest(Path(artifact)).tokenizer)
    return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]


GENAI_BUILD = """
import sys
from bench.peers import GenaiPeer
print(GenaiPeer.build(sys.argv[1], sys.argv[2]))
"""


def build_genai_peer(source: str, precision: str) -> Path:
    """The onnxruntime-genai model (bench.peers.GenaiPeer.build), built in a child process:
    building loads the fp32 weights (about 1.2 GB resident), and every process this one
    forks afterwards would start with that in its ru_maxrss (Linux keeps the high-water mark
    across fork and exec), inflating the measured peaks."""
    proc = subprocess.run([sys.executable, "-c", GENAI_BUILD, source, precision],
                          cwd=common.REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the onnxruntime-genai {precision} peer failed:\n"
                           f"{proc.stderr[-2000:]}")
    sys.stderr.write(proc.stderr)
    return Path(proc.stdout.strip().splitlines()[-1])


def median_row(rows: list[dict]) -> dict:
    return {key: common.median([r[key] for r in rows]) for key in rows[0]}


def engines(args) -> list[tuple[str, str, str, Path]]:
    """(label, worker kind, worker target, what its files are)."""
    out = []
    for spec in args.edgert:
        label, _, artifact = spec.partition("=")
        artifact = str(Path(artifact).resolve())
        out.append((f"edgert {label}, plain", "edgert-off", artifact, Path(artifact)))
        manifest = json.loads((Path(artifact) / "edgert.json").read_text())
        if manifest.get("medusa"):
            out.append((f"edgert {label}, Medusa", "edgert-medusa", artifact, Path(artifact)))
            out.append((f"edgert {label}, Medusa+lookup", "edgert-medusa+lookup", artifact,
                        Path(artifact)))
        if manifest.get("draft"):
            out.append((f"edgert {label}, draft+lookup", "edgert-draft+lookup", artifact,
                        Path(artifact)))
    if args.genai:
        model_dir = build_genai_peer(args.genai_source, args.genai)
        out.append((f"onnxruntime-genai {args.genai}", "genai", str(model_dir), model_dir))
    if args.llamacpp:
        gguf = Path(args.llamacpp).resolve()
        out.append(("llama.cpp (llama-cpp-python)", "llamacpp", str(gguf), gguf))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edgert", action="append", default=[], metavar="LABEL=ARTIFACT")
    parser.add_argument("--genai", default=None, help="precision of an onnxruntime-genai peer "
                                                      "(int4, fp32) built from --genai-source")
    parser.add_argument("--genai-source", default="smollm2-135m")
    parser.add_argument("--llamacpp", default=None, metavar="GGUF")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompts = [p["prompt"] for p in common.load_prompts(args.prompts)]
    if args.worker:
        kind, target = args.worker
        ids = json.loads(Path(args.ids).read_text())
        if kind.startswith("edgert-"):
            print(json.dumps(edgert_worker(target, kind.removeprefix("edgert-"), prompts,
                                           args.new_tokens)))
            return
        workers = {"genai": lambda: genai_worker(target, ids, args.new_tokens),
                   "llamacpp": lambda: llamacpp_worker(target, ids, args.new_tokens)}
        print(json.dumps(workers[kind]()))
        return
    plan = engines(args)
    ids_file = Path(tempfile.mkstemp(suffix=".json")[1])
    ids_file.write_text(json.dumps(chat_ids(args, prompts)))
    samples: dict[str, list[dict]] = {label: [] for label, *_ in plan}
    for _ in range(args.runs):  # engines interleaved, so each sees the same machine load
        for label, kind, target, _files in plan:
            samples[label].append(run_worker(kind, target, args, ids_file))
    ids_file.unlink()
    rows, results = [], []
    for label, _kind, _target, files in plan:
        result = {"engine": label, "files_mb": directory_mb(files),
                  **median_row(samples[label]), "runs": samples[label]}
        results.append(result)
        rows.append({"engine": label, "files MB": result["files_mb"],
                     "load RSS MB": result["load_rss_mb"], "peak RSS MB": result["peak_rss_mb"],
                     "first token s": result["first_token_s"],
                     "decode tok/s": result["decode_tok_s"]})
    cli = []
    for spec in args.edgert:
        label, _, artifact = spec.partition("=")
        kv_mb = next(r["kv_mb"] for r in results if r["engine"] == f"edgert {label}, plain")
        manifest = json.loads((Path(artifact) / "edgert.json").read_text())
        modes = ["off", *(["medusa"] if manifest.get("medusa") else []), "default"]
        for mode in modes:
            runs = [edgert_run_cli(artifact, prompts[0], args.new_tokens, mode)
                    for _ in range(args.runs)]
            cli.append({"artifact": label, "speculative": mode, "kv_mb": kv_mb,
                        **median_row(runs), "runs": runs})
    record = {"bench": "footprint", "machine": common.machine(), "prompts": args.prompts,
              "new_tokens": args.new_tokens, "runs": args.runs, "engines": results,
              "edgert_run": cli}
    common.emit(record, rows, ["engine", "files MB", "load RSS MB", "peak RSS MB",
                               "first token s", "decode tok/s"], args.json)
    for row in cli:
        print(f"edgert run {row['artifact']} ({row['speculative']}): first byte "
              f"{row['first_byte_s']:.2f} s, peak RSS "
              f"{row['peak_rss_mb']:.0f} MB (kv {row['kv_mb']:.0f} MB + "
              f"{row['peak_rss_mb'] - row['kv_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
