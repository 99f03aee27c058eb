"""``edgert compile``: artifact ONNX -> TVM Relax -> edgert passes -> a module per target.

Writes ``ARTIFACT/tvm/<target>/`` atomically (the files named in ``edgert.artifact.tvm_build``)
and records the build in the manifest.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edgert.artifact import tvm_build
from edgert.artifact.io import atomic_directory, load_manifest, sha256_file, update_manifest
from edgert.artifact.manifest import GraphKey
from edgert.dhsa.params import DHSAParams
from edgert.errors import BackendError, EdgertError, last_line
from edgert.passes.targets import SOURCE_EXT, TargetSpec, resolve_target

# nvcc flags of the fatbins (TVM's own nvcc flags, less --use_fast_math: the GPU's numerics
# should stay close to the CPU's)
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "--expt-relaxed-constexpr"]
NVCC_TIMEOUT_S = 900


def import_onnx(path: Path):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    from edgert.passes.quantized_import import bind_quantized_weights, take_matmul_nbits

    model = onnx.load(str(path))
    weights = take_matmul_nbits(model)  # MatMulNBits: TVM's importer does not know it
    try:
        mod = from_onnx(model, keep_params_in_input=False)
    except Exception as exc:  # the importer raises many types; say which graph failed
        raise EdgertError(f"TVM cannot import {path.name} ({str(exc).splitlines()[0][:200]}); "
                          "re-export the artifact with this edgert") from None
    return bind_quantized_weights(mod, weights)


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
            built.export_library(str(out / tvm_build.library(stem)))
            files.append(tvm_build.library(stem))
        except Exception as exc:  # TVM raises TVMError/RuntimeError from the exporters
            if not spec.gpu:
                raise BackendError(f"TVM could not export {stem}.so: {last_line(exc)}") from None
            notes.append(f"{stem}.so not written ({last_line(exc)}): sources only")
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


def _build_graph(mod, stem: str, pipeline: str, ctx, tvm_target, target: str,
                 dump_ir: Path | None):
    import tvm

    from edgert.passes.pipeline import run_pipeline

    with tvm_target:
        mod = run_pipeline(mod, pipeline, ctx, dump_ir, tag=f"{stem}-")
    try:
        with tvm.transform.PassContext(opt_level=3):
            return tvm.compile(mod, tvm_target)
    except Exception as exc:  # TVM raises InternalError/TVMError/ValueError here
        raise BackendError(f"TVM could not build {stem} for {target}: {last_line(exc)}; "
                           "report it with `--dump-ir DIR`'s output") from None


def _keep_tuning(final: Path, tmp: Path) -> None:
    """Copy the tuning records of the previous build into the new one: they outlive it."""
    for kept in tvm_build.KEPT_ACROSS_BUILDS:
        if (final / kept).is_dir():
            shutil.copytree(final / kept, tmp / kept)
        elif (final / kept).exists():
            shutil.copy2(final / kept, tmp / kept)


def compile_artifact(path: Path, target: str = "llvm", device: str | None = None,
                     dump_ir: Path | None = None,
                     log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Compile the artifact's portable graph (and Medusa heads, draft layer) for ``target``; writes
    ``path/tvm/<target>/`` atomically and records it in the manifest. Returns the record
    (:class:`edgert.artifact.tvm_build.TvmBuild` fields plus ``target``)."""
    from edgert.passes.fuse_dhsa_prefill import check_supported
    from edgert.passes.pipeline import CompileContext
    from edgert.passes.tir.kv_commit import build_kv_commit
    from edgert.passes.tuning.database import TuningDatabase

    path = Path(path)
    manifest = load_manifest(path)
    spec, tvm_target = resolve_target(target, device)
    started = time.time()
    graphs = {tvm_build.DECODER: (manifest.graphs[GraphKey.PORTABLE].file, "decoder")}
    if GraphKey.MEDUSA in manifest.graphs:
        graphs[tvm_build.MEDUSA] = (manifest.graphs[GraphKey.MEDUSA].file, "plain")
    if GraphKey.DRAFT_PORTABLE in manifest.graphs:
        graphs[tvm_build.DRAFT] = (manifest.graphs[GraphKey.DRAFT_PORTABLE].file, "draft")
    final = tvm_build.build_directory(path, target)
    tuning = TuningDatabase.load(final)
    if tuning.records:
        log(f"applying {len(tuning.workloads())} tuned workloads from {tuning.path}")
    dhsa = DHSAParams.from_manifest(manifest)
    if dhsa is not None:
        check_supported(dhsa)  # before the slow import
    ctx = CompileContext(manifest.config, gpu=spec.gpu, tuning=tuning, dhsa=dhsa,
                         int32_only=spec.int32_only)
    with atomic_directory(final, overwrite=True) as tmp:
        _keep_tuning(final, tmp)
        files, notes = [], []
        for stem, (graph_file, pipeline) in graphs.items():
            log(f"importing {graph_file} into Relax...")
            mod = import_onnx(path / graph_file)
            log(f"building {stem} for {target}...")
            ex = _build_graph(mod, stem, pipeline, ctx, tvm_target, target, dump_ir)
            files += _write_outputs(ex, spec, tmp, stem, notes)
        # the device KV cache's commit (the TVM backend on a GPU, or with kv_on_device)
        log(f"building {tvm_build.KV_COMMIT} for {target}...")
        try:
            commit = build_kv_commit(manifest.kv_cache, tvm_target,
                                     "int32" if spec.int32_only else "int64")
        except Exception as exc:
            raise BackendError(f"TVM could not build {tvm_build.KV_COMMIT} for {target}: "
                               f"{last_line(exc)}") from None
        files += _write_outputs(commit, spec, tmp, tvm_build.KV_COMMIT, notes)
        for note in notes:
            log(f"note: {note}")
        build = tvm_build.TvmBuild(
            kind=target, output=spec.output, files=files,
            hashes={f: sha256_file(tmp / f) for f in files}, notes=notes,
            tuned={w: tuning.best(w).knobs for w in tuning.workloads()
                   if tuning.best(w) is not None},
            seconds=round(time.time() - started, 1), cuda_kernels=_cuda_kernels(spec, files))
        record = {"target": tvm_target.export() if hasattr(tvm_target, "export") else target,
                  **build.to_dict()}
        (tmp / tvm_build.BUILD_RECORD).write_text(json.dumps(record, indent=2, default=str))
    compiled = dict(manifest.compiled)
    compiled[target] = build.to_dict()
    update_manifest(path, {"compiled": compiled})
    log(f"wrote {final}")
    return record


def _cuda_kernels(spec: TargetSpec, files: list[str]) -> str | None:
    """How a cuda build's kernels load: precompiled fatbins, or source compiled at load."""
    if spec.name != "cuda":
        return None
    sources = [f for f in files if f.endswith(".cu")]
    if all(f[:-3] + ".fatbin" in files for f in sources):
        return f"fatbin ({spec.target['arch']} + PTX)"
    return "source, compiled when the library is loaded"
