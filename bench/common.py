"""Shared pieces of the benchmarks: prompts, medians, RSS, report printing, reference models."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def load_prompts(limit: int | None = None, name: str = "prompts") -> list[dict]:
    """bench/<name>.json: "prompts" (32 chat/code/math/writing prompts) or "prompts_copy" (16
    prompts whose answer copies from the prompt: edits, summaries, code changes)."""
    prompts = json.loads((BENCH_DIR / f"{name}.json").read_text())
    return prompts[:limit] if limit else prompts


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: its
    high-water mark), in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    line = " | ".join(c.ljust(w) for c, w in zip(columns, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def emit(record: dict, rows: list[dict], columns: list[str], json_path: str | None) -> None:
    print_table(rows, columns)
    print(json.dumps(record))
    if json_path:
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")


def transformers_model_from_artifact(manifest):
    """The same fp32 model in transformers, loaded from the artifact's source (GGUF or dir)."""
    import torch
    from transformers import AutoModelForCausalLM

    source = manifest.source
    path = Path(source["path"])
    if source["kind"] == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m bench.<module> ARGS`` in a fresh process from the repository root (each
    engine or mode measured in a process of its own); its output is captured as text."""
    return subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True)


RSS_CHILD = """
import json, sys
import edgert
from bench import common
engine = edgert.load(sys.argv[1], verify=False)
mode = None if sys.argv[3] == "default" else sys.argv[3]
engine.generate("warm up", max_new_tokens=8, speculative=mode)
loaded = common.status_mb("VmRSS")
r = engine.generate("Once upon a time", max_new_tokens=int(sys.argv[2]), chat=False,
                    temperature=float(sys.argv[4]), seed=0, ignore_eos=True, speculative=mode)
print(json.dumps({"new_tokens": len(r.output_ids), "kv_bytes": r.stats["kv_bytes"],
                  "speculative": r.stats["speculative"],
                  "rss_after_load_mb": loaded, "rss_after_mb": common.status_mb("VmRSS")}))
"""


def rss_check(artifact, speculative: str = "default", temperature: float = 0.8,
              lengths=(100, 2000)) -> dict:
    """Fixed memory: in a fresh process per length, RSS (``VmRSS``, not the peak) after load
    and after generating that many tokens (``ignore_eos``) in mode ``speculative``."""
    out = {}
    for n in lengths:
        proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(Path(artifact).resolve()),
                               str(n), speculative, str(temperature)], capture_output=True,
                              text=True, check=True, cwd=REPO_ROOT)
        out[str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out
