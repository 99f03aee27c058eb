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

from edgert.artifact.io import load_manifest, sha256_file, update_manifest
from edgert.errors import BackendError, EdgertError

TVM_DIR = "tvm"
KEPT_ACROSS_BUILDS = ("tuning.json", "metaschedule")


@dataclass(frozen=True)
class TargetSpec:
    """How edgert builds for a target and what it writes."""

    name: str
    target: dict
    # "library": loadable .so files; "library+source": .so files (cuda: the CUDA kernels inside,
    # as source TVM compiles when the library is loaded, or from the fatbin written next to
    # it) plus the device sources; "source": device sources only (no runtime for them here)
    output: str
    supported: bool = True
    reason: str = ""
    int32_only: bool = False  # no 64-bit integers on the device (WGSL)

    @property
    def gpu(self) -> bool:
        return self.name != "llvm"

    @property
    def writes_library(self) -> bool:
        return self.output.startswith("library")


TARGETS: dict[str, TargetSpec] = {
    "llvm": TargetSpec("llvm", {"kind": "llvm"}, "library"),
    "cuda": TargetSpec("cuda", {"kind": "cuda", "arch": "sm_80"}, "library+source"),
    "opencl": TargetSpec("opencl", {"kind": "opencl"}, "source"),
    "metal": TargetSpec("metal", {"kind": "metal"}, "source"),
    "webgpu": TargetSpec("webgpu", {"kind": "webgpu"}, "source", int32_only=True),
    "vulkan": TargetSpec("vulkan", {"kind": "vulkan"}, "source", supported=False,
                         reason="this TVM build has no SPIR-V backend (target.build.vulkan is "
                                "missing); build TVM with USE_VULKAN=ON to target Vulkan"),
}
SOURCE_EXT = {"cuda": "cu", "opencl": "cl", "metal": "metal", "webgpu": "wgsl"}
# nvcc flags of the fatbins (TVM's own nvcc flags, less --use_fast_math: the GPU's numerics
# should stay close to the CPU's)
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "--expt-relaxed-constexpr"]
NVCC_TIMEOUT_S = 900


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
    if spec.gpu:
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


def _device_modules(module) -> list:
    """The device-code modules (cuda, opencl, ...) imported, at any depth, by ``module``."""
    found = []
    for imported in module.imports:
        if imported.kind in SOURCE_EXT:
            found.append(imported)
        else:
            found += _device_modules(imported)
    return found


def _cuda_fatbin(out: Path, source: str, fatbin: str, arch: str) -> str | None:
    """nvcc ``source`` -> ``fatbin`` (SASS for ``arch`` and its PTX, which newer GPUs JIT);
    returns why not, or None when written."""
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return (f"no nvcc here: no {fatbin}; the CUDA source inside the library is compiled when "
                "it is loaded (needs cuda-python's NVRTC or nvcc on that machine)")
    sm = arch.replace("sm_", "")
    cmd = [nvcc, "--fatbin", *NVCC_FLAGS, f"-gencode=arch=compute_{sm},code=[sm_{sm},compute_{sm}]",
           "-o", str(out / fatbin), str(out / source)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"nvcc took over {NVCC_TIMEOUT_S} s on {source}: no {fatbin}"
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        why = (errors or proc.stderr.strip().splitlines() or ["no output"])[0][:200]
        return f"nvcc failed on {source} ({why}): no {fatbin}"
    return None


def _write_outputs(built, spec: TargetSpec, out: Path, stem: str, notes: list[str]) -> list[str]:
    """Write what ``built`` (a Relax executable or a runtime module) becomes for ``spec``; adds
    to ``notes`` why anything expected was not written."""
    files = []
    if spec.writes_library:
        try:
            built.export_library(str(out / f"{stem}.so"))
            files.append(f"{stem}.so")
        except Exception as exc:  # TVM raises TVMError/RuntimeError from the exporters
            if not spec.gpu:
                raise BackendError(f"TVM could not export {stem}.so: {_last_line(exc)}") from None
            notes.append(f"{stem}.so not written ({_last_line(exc)}): sources only")
    if not spec.gpu:
        return files
    devices = _device_modules(getattr(built, "mod", built))
    for i, dev in enumerate(devices):
        name = f"{stem}.{i}" if len(devices) > 1 else stem
        source = f"{name}.{SOURCE_EXT[spec.name]}"
        (out / source).write_text(dev.inspect_source())
        files.append(source)
        if spec.name == "cuda":
            why = _cuda_fatbin(out, source, f"{name}.fatbin", spec.target["arch"])
            if why is None:
                files.append(f"{name}.fatbin")
            else:
                notes.append(why)
    return files


def compile_artifact(path: Path, target: str = "llvm", device: str | None = None,
                     dump_ir: Path | None = None,
                     log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Compile the artifact's portable graph (and Medusa heads) for ``target``; writes
    ``path/tvm/<target>/`` atomically and records it in the manifest."""
    import tvm

    from edgert.dhsa.params import DHSAParams
    from edgert.passes.fuse_dhsa_prefill import check_supported
    from edgert.passes.pipeline import CompileContext, run_pipeline
    from edgert.passes.tir.kv_commit import build_kv_commit
    from edgert.passes.tuning.database import TuningDatabase

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
    if dhsa is not None:
        check_supported(dhsa)  # before the slow import
    ctx = CompileContext(manifest.config, gpu=spec.gpu, tuning=tuning, dhsa=dhsa,
                         int32_only=spec.int32_only)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target}.tmp-", dir=final.parent))
    try:
        for kept in KEPT_ACROSS_BUILDS:  # the tuning records outlive a rebuild
            if (final / kept).exists():
                copy = shutil.copytree if (final / kept).is_dir() else shutil.copy2
                copy(final / kept, tmp / kept)
        files, notes = [], []
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
            files += _write_outputs(ex, spec, tmp, stem, notes)
        # the device KV cache's commit (the TVM backend on a GPU, or with kv_on_device)
        log(f"building kv_commit for {target}...")
        try:
            commit = build_kv_commit(manifest.kv_cache, tvm_target,
                                     "int32" if spec.int32_only else "int64")
        except Exception as exc:
            raise BackendError(f"TVM could not build kv_commit for {target}: "
                               f"{_last_line(exc)}") from None
        files += _write_outputs(commit, spec, tmp, "kv_commit", notes)
        for note in notes:
            log(f"note: {note}")
        record = {"target": tvm_target.export() if hasattr(tvm_target, "export") else target,
                  "kind": target, "output": spec.output, "files": files, "notes": notes,
                  "hashes": {f: sha256_file(tmp / f) for f in files},
                  "tuned": {w: tuning.best(w).knobs for w in tuning.workloads()
                            if tuning.best(w) is not None},
                  "seconds": round(time.time() - started, 1)}
        if spec.name == "cuda":
            sources = [f for f in files if f.endswith(".cu")]
            precompiled = all(f[:-3] + ".fatbin" in files for f in sources)
            record["cuda_kernels"] = (f"fatbin ({spec.target['arch']} + PTX)" if precompiled
                                      else "source, compiled when the library is loaded")
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
