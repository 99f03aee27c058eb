"""edgert on an NVIDIA GPU: the cuda build, edgert's kernels on the GPU, TVM and ONNX Runtime.

Run through scripts/gpu_check.sh (it checks for a GPU first and exports the artifact when it
is missing). Never part of the test suite. Steps:

1. ``edgert compile ARTIFACT --target cuda`` (``--no-compile`` reuses the build there);
2. edgert's kernels built for this GPU and run on it against their NumPy references:
   tree attention (several trees, prefixes 0 .. 700, two schedules), kv-append, kv-commit (the
   device cache's Medusa commit, all layers' buffers), DHSA boundaries and DHSA attention (the
   artifact's DHSA parameters, dynamic and fixed chunks);
3. greedy and Medusa decoding of a few bench prompts (bench/prompts.json), and one DHSA
   prefill, through the TVM cuda build (cache in GPU memory) and through ONNX Runtime's CUDA
   EP, compared token for token with ONNX Runtime on the CPU;
4. one JSON record on stdout: kernel max errors, identical counts, tokens/s per backend.

Exit status: 0 when every kernel is within tolerance and the TVM cuda backend ran; 1
otherwise (the record says what failed); 2 when there is no GPU (one line on stderr).

``--cpu-dry-run`` runs step 2 only, built for llvm on this CPU: a check of this script where
there is no GPU (it does not check anything GPU-specific).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # float32 kernels vs NumPy (sums in another order; GPU exp/div)
TREES = {
    "decode": [-1],
    "chain4": [-1, 0, 1, 2],
    "medusa": [-1, 0, 0, 1, 2, 3],
    "wide": [-1, 0, 0, 0, 1, 1, 2, 4],
    "deep16": [-1, *range(15)],
}
PREFIXES = [0, 1, 37, 700]


def fail(message: str, code: int = 2) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(code)


def gpu_target():
    """(tvm device, target, description) of GPU 0, or exit 2 with one line."""
    import tvm

    from edgert.errors import BackendError
    from edgert.runtime.backends.tvm_vm import check_cuda_device

    try:
        check_cuda_device()
    except BackendError as exc:
        fail(str(exc))
    dev = tvm.cuda(0)
    arch = "sm_" + dev.compute_version.replace(".", "")
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    return dev, target, {"name": dev.device_name, "arch": arch}


def use_a_cuda_compiler() -> str:
    """Kernels built here are compiled through TVM's callback: NVRTC (cuda-python) by default,
    nvcc when cuda-python is missing."""
    try:
        import cuda.bindings  # noqa: F401

        return "nvrtc"
    except ImportError:
        if shutil.which("nvcc"):
            os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
            return "nvcc"
        fail("no CUDA compiler for the kernel checks: install cuda-python (NVRTC) or the CUDA "
             "toolkit (nvcc)")
    return ""


# -- 2. kernels -----------------------------------------------------------------------------
class Kernels:
    def __init__(self, dev, target, gpu: bool) -> None:
        self.dev, self.target, self.gpu = dev, target, gpu

    def build(self, name: str, func):
        import tvm

        return tvm.tirx.build(tvm.IRModule({name: func}), self.target)[name]

    def tensor(self, array):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(array), device=self.dev)


def check_tree_attention(k: Kernels, hq: int, hkv: int, d: int) -> dict:
    from edgert.medusa.tree_order import tree_order_from_parents
    from edgert.passes.tir.tree_attention import (
        TreeAttentionKnobs,
        tree_attention_reference,
        tree_attention_tir,
    )

    group = hq // hkv
    worst, cases, worst_case = 0.0, 0, None
    for knobs in (TreeAttentionKnobs(), TreeAttentionKnobs(group, 8, 1)):
        kernel = k.build("edgert_tree_attention", tree_attention_tir(hq, hkv, d, k.gpu, knobs))
        for name, parents in TREES.items():
            for past in PREFIXES:
                rng = np.random.default_rng(len(parents) * 1000 + past)
                n, cap = len(parents), past + len(parents) + 5
                q = rng.standard_normal((n, hq, d)).astype(np.float32)
                kc = rng.standard_normal((hkv, cap, d)).astype(np.float32)
                vc = rng.standard_normal((hkv, cap, d)).astype(np.float32)
                order = tree_order_from_parents(np.array(parents))
                out = k.tensor(np.zeros((n, hq, d), np.float32))
                kernel(k.tensor(q), k.tensor(kc), k.tensor(vc), k.tensor(order), past, out)
                want = tree_attention_reference(q, kc, vc, order, past)
                error = float(np.abs(out.numpy() - want).max())
                if error >= worst:
                    worst, worst_case = error, f"{name}, past {past}, {knobs}"
                cases += 1
    return {"max_error": worst, "worst_case": worst_case, "cases": cases, "ok": worst <= ATOL}


def check_kv_append(k: Kernels, hkv: int, d: int) -> dict:
    from edgert.passes.tir.tree_attention import kv_append_tir

    kernel = k.build("edgert_kv_append", kv_append_tir(hkv, d, k.gpu))
    worst, cases = 0.0, 0
    for past, n in ((0, 1), (0, 300), (37, 1), (511, 6), (700, 324)):
        rng = np.random.default_rng(past + n)
        before = rng.standard_normal((hkv, 1024, d)).astype(np.float32)
        new = rng.standard_normal((n, hkv, d)).astype(np.float32)
        cache = k.tensor(before)
        kernel(cache, k.tensor(new), past)
        want = before.copy()
        want[:, past:past + n] = new.transpose(1, 0, 2)
        worst = max(worst, float(np.abs(cache.numpy() - want).max()))
        cases += 1
    return {"max_error": worst, "cases": cases, "ok": worst == 0.0}


def check_kv_commit(k: Kernels, spec) -> dict:
    """The device cache (all layers' buffers, one launch) against the NumPy cache."""
    import dataclasses

    from edgert.passes.tir.kv_commit import build_kv_commit
    from edgert.runtime.device_kv_cache import DeviceKVCache
    from edgert.runtime.kv_cache import KVCache

    spec = dataclasses.replace(spec, capacity=96)
    host = KVCache(spec)
    rng = np.random.default_rng(0)
    host.storage[...] = rng.standard_normal(host.storage.shape)
    device = DeviceKVCache(spec, k.dev, build_kv_commit(spec, k.target))
    for i, tensor in enumerate(device.tensors()):
        tensor.copyfrom(np.ascontiguousarray(host.storage[i // 2, i % 2, 0]))
    worst, steps = 0.0, 0
    paths = [[0], [0, 1, 2], [0, 2, 5], [0, 3, 4, 7], [1, 2, 6, 7], [0, 1, 3]]
    while host.length + 8 <= host.capacity:
        offsets = np.array(paths[steps % len(paths)])
        host.commit_path(offsets)
        device.commit_path(offsets)
        worst = max(worst, float(np.abs(device.to_numpy() - host.storage).max()))
        steps += 1
    return {"max_error": worst, "commits": steps, "buffers": 2 * spec.num_layers,
            "ok": worst == 0.0}


def check_dhsa(k: Kernels, hq: int, hkv: int, d: int, params) -> dict:
    import dataclasses

    from edgert.dhsa import reference
    from edgert.passes.tir.dhsa_attention import DHSAKnobs, dhsa_attention_tir
    from edgert.passes.tir.dhsa_boundaries import dhsa_boundaries_tir

    lengths = [params.budget + 300, 2 * params.budget + 77]
    boundary_mismatches, boundary_cases = 0, 0
    for threshold in (params.boundary_threshold, 1.1):
        p = dataclasses.replace(params, boundary_threshold=threshold)
        kernel = k.build("edgert_dhsa_boundaries", dhsa_boundaries_tir(hq, hkv, d, p, k.gpu))
        for seq_len in lengths:
            for fixed in (0, 100):
                rng = np.random.default_rng(seq_len + fixed)
                q = rng.standard_normal((seq_len, hq, d)).astype(np.float32)
                kk = rng.standard_normal((seq_len, hkv, d)).astype(np.float32)
                out = k.tensor(np.full(seq_len, 7, np.int32))
                kernel(k.tensor(q), k.tensor(kk), fixed, out)
                ref = dataclasses.replace(p, fixed_chunk=fixed)
                want = reference.chunk_starts(reference.boundary_ratios(
                    q.transpose(1, 0, 2), kk.transpose(1, 0, 2), ref), ref)
                boundary_mismatches += int((out.numpy() != want).sum())
                boundary_cases += 1
    worst, cases = 0.0, 0
    for knobs in (DHSAKnobs(), DHSAKnobs(hq // hkv, 8)):
        kernel = k.build("edgert_dhsa_attention",
                         dhsa_attention_tir(hq, hkv, d, params, k.gpu, knobs))
        for seq_len in lengths:
            for chunks in ("random", "fixed"):
                rng = np.random.default_rng(seq_len)
                q = rng.standard_normal((seq_len, hq, d)).astype(np.float32)
                kk = rng.standard_normal((seq_len, hkv, d)).astype(np.float32)
                v = rng.standard_normal((seq_len, hkv, d)).astype(np.float32)
                if chunks == "random":
                    starts = rng.random(seq_len) < 0.02
                else:
                    starts = np.arange(seq_len) % 64 == 0
                starts[0] = True
                out = k.tensor(np.zeros(q.shape, np.float32))
                kernel(k.tensor(q), k.tensor(kk), k.tensor(v), k.tensor(starts.astype(np.int32)),
                       out)
                qh, kh, vh = (a.transpose(1, 0, 2) for a in (q, kk, v))
                selection = reference.select_keys(reference.token_scores(qh, kh, starts, params),
                                                  seq_len, params)
                want = reference.sparse_attention(qh, kh, vh, selection, params)
                worst = max(worst, float(np.abs(out.numpy() - want.transpose(1, 0, 2)).max()))
                cases += 1
    return {"boundaries": {"mismatched_starts": boundary_mismatches, "cases": boundary_cases,
                           "ok": boundary_mismatches == 0},
            "attention": {"max_error": worst, "cases": cases, "ok": worst <= ATOL}}


def kernel_checks(manifest, dev, target, gpu: bool) -> dict:
    from edgert.dhsa.params import DHSAParams

    config = manifest.config
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = config.head_dim
    k = Kernels(dev, target, gpu)
    started = time.time()
    record = {"tree_attention": check_tree_attention(k, hq, hkv, d),
              "kv_append": check_kv_append(k, hkv, d),
              "kv_commit": check_kv_commit(k, manifest.kv_cache)}
    if manifest.dhsa:
        dhsa = check_dhsa(k, hq, hkv, d, DHSAParams.from_dict(manifest.dhsa))
        record["dhsa_boundaries"], record["dhsa_attention"] = dhsa["boundaries"], dhsa["attention"]
    record["seconds"] = round(time.time() - started, 1)
    return record


# -- 3. backends ----------------------------------------------------------------------------
def long_prompt(engine, min_tokens: int) -> str:
    prompts = json.loads((ROOT / "bench" / "prompts.json").read_text())
    text, i = "", 0
    while len(engine.tokenizer.encode_raw(text)) <= min_tokens:
        text += prompts[i % len(prompts)]["prompt"] + " "
        i += 1
    return text


def run_engine(engine, prompts: list[str], new_tokens: int, medusa: bool) -> dict:
    engine.generate("warm up", max_new_tokens=4, medusa=medusa)
    ids, tokens, elapsed, decode, accepted = [], 0, 0.0, [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        result = engine.generate(prompt, max_new_tokens=new_tokens, medusa=medusa)
        elapsed += time.perf_counter() - t0
        ids.append(result.output_ids)
        tokens += len(result.output_ids)
        decode.append(result.stats["decode_tokens_per_s"])
        accepted.append(result.stats["mean_accepted"])
    row = {"ids": ids, "tokens_per_s": round(tokens / elapsed, 1),
           "decode_tokens_per_s": round(float(np.median(decode)), 1)}
    if medusa:
        row["mean_accepted"] = round(float(np.mean(accepted)), 2)
    return row


def backend_checks(path: Path, prompts: list[str], new_tokens: int) -> tuple[dict, bool]:
    import edgert
    from edgert.errors import EdgertError

    engines, record = {}, {}
    for name, kwargs in (("ort_cpu", {}), ("tvm_cuda", {"backend": "tvm", "device": "cuda"}),
                         ("ort_cuda", {"device": "cuda"})):
        try:
            t0 = time.time()
            engines[name] = edgert.load(path, **kwargs)
            record[name] = {"load_s": round(time.time() - t0, 1)}
        except EdgertError as exc:
            record[name] = {"error": str(exc)}
    if "ort_cpu" not in engines:
        fail(f"ONNX Runtime on the CPU cannot load {path}: {record['ort_cpu']['error']}", 1)
    reference = engines["ort_cpu"]
    modes = {"greedy": False, "medusa": True} if reference.has_medusa else {"greedy": False}
    dhsa_text = long_prompt(reference, reference.dhsa.min_context) if reference.dhsa else None
    for name, engine in engines.items():
        if name == "tvm_cuda":
            record[name]["kv_cache"] = type(engine.cache).__name__
        for mode, medusa in modes.items():
            try:
                record[name][mode] = run_engine(engine, prompts, new_tokens, medusa)
            except EdgertError as exc:
                record[name][mode] = {"error": str(exc)}
        if dhsa_text is not None:
            try:
                t0 = time.perf_counter()
                result = engine.generate(dhsa_text, max_new_tokens=16, chat=False, dhsa=True,
                                         medusa=False)
                record[name]["dhsa"] = {"ids": result.output_ids,
                                        "prefill_ms": round(result.stats["prefill_ms"], 1),
                                        "seconds": round(time.perf_counter() - t0, 2)}
            except EdgertError as exc:
                record[name]["dhsa"] = {"error": str(exc)}
    for name, row in record.items():  # identical counts against ORT on the CPU
        if name == "ort_cpu":
            continue
        for mode in (*modes, "dhsa"):
            got, want = row.get(mode), record["ort_cpu"].get(mode)
            if not got or "error" in got or not want or "error" in want:
                continue
            if mode == "dhsa":
                got["identical_to_ort_cpu"] = got["ids"] == want["ids"]
            else:
                got["identical_to_ort_cpu"] = sum(a == b for a, b in zip(got["ids"], want["ids"]))
                got["prompts"] = len(want["ids"])
    for row in record.values():  # the ids made the counts; the record keeps the figures
        for mode in (*modes, "dhsa"):
            if isinstance(row.get(mode), dict):
                row[mode].pop("ids", None)
    tvm_ok = "error" not in record["tvm_cuda"] and all(
        "error" not in record["tvm_cuda"].get(mode, {}) for mode in modes)
    return record, tvm_ok


def compile_cuda(path: Path) -> dict:
    edgert_cli = Path(sys.executable).parent / "edgert"
    cmd = ([str(edgert_cli)] if edgert_cli.exists() else [sys.executable, "-m", "edgert.cli"])
    t0 = time.time()
    proc = subprocess.run([*cmd, "compile", str(path), "--target", "cuda"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"edgert compile --target cuda failed: {last}", 1)
    build = json.loads((path / "tvm" / "cuda" / "build.json").read_text())
    return {"seconds": round(time.time() - t0, 1), "cuda_kernels": build.get("cuda_kernels"),
            "notes": build.get("notes", []), "files": build["files"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, nargs="?",
                        default=ROOT / "artifacts" / "smollm2-135m")
    parser.add_argument("--prompts", type=int, default=3, help="bench prompts per mode")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true",
                        help="use the cuda build already in the artifact")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="kernel checks only, built for llvm on this CPU (checks the script)")
    args = parser.parse_args()

    from edgert.artifact.io import load_manifest

    if not (args.artifact / "edgert.json").is_file():
        fail(f"no artifact at {args.artifact}; export it first (scripts/gpu_check.sh does)", 1)
    manifest = load_manifest(args.artifact, verify=False)
    if args.cpu_dry_run:
        import tvm

        target = tvm.target.Target({"kind": "llvm"})
        record = {"check": "gpu", "dry_run": "llvm on the CPU",
                  "kernels": kernel_checks(manifest, tvm.cpu(), target, gpu=False)}
        print(json.dumps(record))
        return
    started = time.time()
    dev, target, gpu = gpu_target()
    record = {"check": "gpu", "gpu": gpu, "artifact": str(args.artifact),
              "kernel_compiler": use_a_cuda_compiler()}
    if args.no_compile:
        record["compile"] = "reused"
    else:
        record["compile"] = compile_cuda(args.artifact)
    record["kernels"] = kernel_checks(manifest, dev, target, gpu=True)
    prompts = [p["prompt"] for p in json.loads((ROOT / "bench" / "prompts.json").read_text())
               [:args.prompts]]
    record["backends"], tvm_ok = backend_checks(args.artifact, prompts, args.new_tokens)
    kernels_ok = all(row.get("ok", True) for row in record["kernels"].values()
                     if isinstance(row, dict))
    record["ok"] = kernels_ok and tvm_ok
    record["seconds"] = round(time.time() - started, 1)
    print(json.dumps(record))
    sys.exit(0 if record["ok"] else 1)


if __name__ == "__main__":
    main()
