"""Export at scale: a random-weight model of TinyLlama-1.1B's shape, from an fp16 HF directory,
to fp32 and q4 artifacts: export time and peak RSS, artifact size, greedy ids against
transformers.

    python -m bench.large_export [--workdir /tmp/edgert-large] [--tokens 8]
                                 [--json bench/results/large_export.json]

Every step runs in a process of its own and its peak RSS is that process's own (``wait4``):
the source directory is built (22 layers, hidden 2048, 32/4 heads, vocab 32000, fp16
safetensors: 2.2 GB), each artifact exported with ``edgert export --max-context 512``, then
loaded by edgert for ``--tokens`` greedy tokens of a raw prompt, and the same ids produced by
transformers (fp32) in another process. The fp32 artifact is over 2 GB (protobuf's limit on
one message): the export traces each graph to a file and streams the weights into the data
file, so its peak stays near two copies of the fp32 weights.
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

SHAPE = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
         "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "tie_word_embeddings": False, "initializer_range": 0.02, "bos_token_id": 0,
         "eos_token_id": 2}
PROMPT = "The history of the city begins with a small settlement on the river"
MAX_CONTEXT = 512

BUILD_SOURCE = """
import json, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from tests.tiny_model import CHATML_TEMPLATE, build_tokenizer
out = Path(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**json.loads(sys.argv[2]))).to(torch.float16)
model.save_pretrained(str(out))
build_tokenizer().save(str(out / "tokenizer.json"))
(out / "tokenizer_config.json").write_text(json.dumps(
    {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}))
"""

EDGERT_GREEDY = """
import json, sys, edgert
engine = edgert.load(sys.argv[1])
result = engine.generate(sys.argv[2], max_new_tokens=int(sys.argv[3]), chat=False,
                         speculative="off", ignore_eos=True)
print(json.dumps({"prompt_ids": result.prompt_ids, "output_ids": result.output_ids}))
"""

TRANSFORMERS_GREEDY = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = json.loads(sys.argv[2])
with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=int(sys.argv[3]), do_sample=False,
                         min_new_tokens=int(sys.argv[3]))
print(json.dumps(out[0, len(ids):].tolist()))
"""


def run_measured(args: list[str]) -> tuple[str, float, float]:
    """(stdout, seconds, peak RSS in MiB) of one child process; raises on failure. The child
    is reaped with ``wait4``, which returns its own resource usage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, cwd=common.REPO_ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(args[:4])}... failed:\n{err.read()[-2000:]}")
        return out.read(), seconds, usage.ru_maxrss / 1024


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def build_source(directory: Path) -> Path:
    if not (directory / "model.safetensors").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        run_measured(python(BUILD_SOURCE, str(directory), json.dumps(SHAPE)))
    return directory


def dir_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir()) / 2**20


def measure(source: Path, out: Path, weights: str, tokens: int) -> dict:
    """Export ``source`` with ``--weights weights``, then greedy-decode it with edgert."""
    _, export_s, export_peak = run_measured(
        [sys.executable, "-m", "edgert.cli", "export", str(source), "-o", str(out),
         "--weights", weights, "--max-context", str(MAX_CONTEXT), "--force"])
    stdout, run_s, run_peak = run_measured(python(EDGERT_GREEDY, str(out), PROMPT, str(tokens)))
    ids = json.loads(stdout.strip().splitlines()[-1])
    return {"weights": weights, "export_s": round(export_s, 1),
            "export_peak_rss_mb": round(export_peak), "artifact_mb": round(dir_mb(out)),
            "run_s": round(run_s, 1), "run_peak_rss_mb": round(run_peak), **ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/edgert-large")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    source = build_source(work / "tinyllama-shape-fp16")
    rows = [measure(source, work / f"artifact-{w}", w, args.tokens) for w in ("fp32", "q4")]
    prompt_ids = rows[0]["prompt_ids"]
    stdout, _, ref_peak = run_measured(python(TRANSFORMERS_GREEDY, str(source),
                                              json.dumps(prompt_ids), str(args.tokens)))
    reference = json.loads(stdout.strip().splitlines()[-1])
    for row in rows:
        row["greedy_equal_transformers"] = row["output_ids"] == reference
        row["agreeing_tokens"] = sum(a == b for a, b in zip(row["output_ids"], reference))
    record = {"bench": "large_export", "machine": common.machine(), "shape": SHAPE,
              "source_mb": round(dir_mb(source)), "max_context": MAX_CONTEXT,
              "tokens": args.tokens, "transformers_ids": reference,
              "transformers_peak_rss_mb": round(ref_peak), "rows": rows,
              "command": "python -m bench.large_export --json bench/results/large_export.json"}
    columns = ["weights", "export_s", "export_peak_rss_mb", "artifact_mb", "run_s",
               "run_peak_rss_mb", "greedy_equal_transformers", "agreeing_tokens"]
    common.emit(record, rows, columns, args.json)


if __name__ == "__main__":
    main()
