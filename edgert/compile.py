"""``edgert compile``: artifact ONNX -> TVM Relax -> edgert passes -> a module per target."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgert.artifact import load_manifest, sha256_file, update_manifest
from edgert.errors import BackendError, EdgertError

TVM_DIR = "tvm"
KEPT_ACROSS_BUILDS = ("tuning.json", "metaschedule")


@dataclass(frozen=True)
class TargetSpec:
    """How edgert builds for a target and what it writes."""

    name: str
    target: dict
    output: str  # "library" (a loadable .so) or "source" (device source next to a host .so)
    supported: bool = True
    reason: str = ""


TARGETS: dict[str, TargetSpec] = {
    "llvm": TargetSpec("llvm", {"kind": "llvm"}, "library"),
    "cuda": TargetSpec("cuda", {"kind": "cuda", "arch": "sm_80"}, "source"),
    "opencl": TargetSpec("opencl", {"kind": "opencl"}, "source"),
    "metal": TargetSpec("metal", {"kind": "metal"}, "source"),
    "webgpu": TargetSpec("webgpu", {"kind": "webgpu"}, "source", supported=False,
                         reason="WGSL has no 64-bit integers and the artifact's graph carries "
                                "int64 tensors (token ids, positions, gather indices) into "
                                "generic ops; edgert's own kernels build for webgpu, the rest of "
                                "the graph does not yet (target opencl or metal instead)"),
    "vulkan": TargetSpec("vulkan", {"kind": "vulkan"}, "source", supported=False,
                         reason="this TVM build has no SPIR-V backend (target.build.vulkan is "
                                "missing); build TVM with USE_VULKAN=ON to target Vulkan"),
}


def resolve_target(name: str, device: str | None = None, cores: int | None = None):
    import os

    import tvm

    spec = TARGETS.get(name)
    if spec is None:
        raise EdgertError(f"unknown target '{name}'; choose one of {', '.join(TARGETS)}")
    if not spec.supported:
        raise BackendError(f"cannot compile for {name}: {spec.reason}")
    target = dict(spec.target)
    if name == "llvm":
        import tvm.target.codegen

        target["num-cores"] = cores or os.cpu_count() or 1
        # this machine's CPU (vector width, FMA); a generic x86-64 build is SSE2 only
        target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    if device:
        target["device"] = device
    if spec.output == "source":
        return spec, tvm.target.Target(target, host={"kind": "llvm"})
    return spec, tvm.target.Target(target)


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:240]


def import_onnx(path: Path):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(onnx.load(str(path)), keep_params_in_input=False)
    except Exception as exc:  # the importer raises many types; say which graph failed
        raise EdgertError(f"TVM cannot import {path.name} ({str(exc).splitlines()[0][:200]}); "
                          "re-export the artifact with this edgert") from None


def _write_outputs(ex, spec: TargetSpec, out: Path, stem: str) -> list[str]:
    files = []
    if spec.output == "library":
        ex.export_library(str(out / f"{stem}.so"))
        return [f"{stem}.so"]
    host = ex.mod.imports[0]
    for i, dev in enumerate(host.imports):
        ext = {"cuda": "cu", "opencl": "cl", "metal": "metal", "webgpu": "wgsl"}[spec.name]
        name = f"{stem}.{i}.{ext}" if len(host.imports) > 1 else f"{stem}.{ext}"
        (out / name).write_text(dev.inspect_source())
        files.append(name)
    if spec.name == "cuda" and shutil.which("nvcc") and files:
        import subprocess

        fatbin = f"{stem}.fatbin"
        arch = spec.target["arch"].replace("sm_", "")
        proc = subprocess.run(["nvcc", "--fatbin", f"-arch=sm_{arch}", "-o", str(out / fatbin),
                               str(out / files[0])], capture_output=True, text=True)
        if proc.returncode == 0:
            files.append(fatbin)
    return files


def compile_artifact(path: Path, target: str = "llvm", device: str | None = None,
                     dump_ir: Path | None = None,
                     log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Compile the artifact's portable graph (and Medusa heads) for ``target``; writes
    ``path/tvm/<target>/`` atomically and records it in the manifest."""
    import tvm

    from edgert.dhsa.params import DHSAParams
    from edgert.passes.pipeline import CompileContext, run_pipeline
    from edgert.tuning.database import TuningDatabase

    path = Path(path)
    manifest = load_manifest(path)
    spec, tvm_target = resolve_target(target, device)
    started = time.time()
    graphs = {"decoder": (manifest.graphs["portable"].file, "decoder")}
    if "medusa" in manifest.graphs:
        graphs["medusa"] = (manifest.graphs["medusa"].file, "plain")
    final = path / TVM_DIR / target
    final.parent.mkdir(exist_ok=True)
    tuning = TuningDatabase.load(final)
    if tuning.records:
        log(f"applying {len(tuning.workloads())} tuned workloads from {tuning.path}")
    dhsa = DHSAParams.from_dict(manifest.dhsa) if manifest.dhsa else None
    ctx = CompileContext(manifest.config, gpu=spec.output == "source", tuning=tuning, dhsa=dhsa)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target}.tmp-", dir=final.parent))
    try:
        for kept in KEPT_ACROSS_BUILDS:  # the tuning records outlive a rebuild
            if (final / kept).exists():
                copy = shutil.copytree if (final / kept).is_dir() else shutil.copy2
                copy(final / kept, tmp / kept)
        files = []
        for stem, (graph_file, pipeline) in graphs.items():
            log(f"importing {graph_file} into Relax...")
            mod = import_onnx(path / graph_file)
            with tvm_target:
                mod = run_pipeline(mod, pipeline, ctx, dump_ir, tag=f"{stem}-")
            log(f"building {stem} for {target}...")
            try:
                with tvm.transform.PassContext(opt_level=3):
                    ex = tvm.compile(mod, tvm_target)
            except Exception as exc:  # TVM raises InternalError/TVMError/ValueError here
                raise BackendError(f"TVM could not build {stem} for {target}: "
                                   f"{_last_line(exc)}; report it with `--dump-ir DIR`'s "
                                   "output") from None
            files += _write_outputs(ex, spec, tmp, stem)
        record = {"target": tvm_target.export() if hasattr(tvm_target, "export") else target,
                  "kind": target, "output": spec.output, "files": files,
                  "hashes": {f: sha256_file(tmp / f) for f in files},
                  "tuned": {w: tuning.best(w).knobs for w in tuning.workloads()
                            if tuning.best(w) is not None},
                  "seconds": round(time.time() - started, 1)}
        (tmp / "build.json").write_text(json.dumps(record, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    compiled = dict(manifest.compiled)
    compiled[target] = {k: v for k, v in record.items() if k != "target"}
    update_manifest(path, {"compiled": compiled})
    log(f"wrote {final}")
    return record
