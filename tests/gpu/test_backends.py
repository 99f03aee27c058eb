"""The artifact compiled for cuda (``edgert compile --target cuda``, once), then greedy and
Medusa decoding of a few bench prompts (bench/prompts.json) and one DHSA prefill through the
TVM cuda build (cache in GPU memory) and ONNX Runtime's CUDA EP, compared token for token with
ONNX Runtime on the CPU.

Hard failures: the cuda build, ONNX Runtime on the CPU loading the
artifact, and the TVM cuda backend loading and decoding (greedy, Medusa). Token identity to
ONNX Runtime on the CPU, ONNX Runtime's CUDA EP and the TVM DHSA prefill are reported: the
record has the identical counts and tokens/s, and a difference is an xfail, not a failure
(float sums in another order may flip a near-tie)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.gpu.checks import ROOT

pytestmark = pytest.mark.gpu

BACKENDS = {"ort_cpu": {}, "tvm_cuda": {"backend": "tvm", "device": "cuda"},
            "ort_cuda": {"device": "cuda"}}
DHSA_NEW_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def cuda_only(gpu_device):
    if gpu_device.name != "cuda":
        pytest.skip(f"CPU dry run ({gpu_device.name}): the backend checks need a CUDA device")


@pytest.fixture(scope="module")
def cuda_build(artifact, gpu_settings, gpu_record) -> dict:
    """``edgert compile ARTIFACT --target cuda``, in this process (the record's ``compile``)."""
    from edgert.artifact.tvm_build import BUILD_RECORD, build_directory
    from edgert.passes.build import compile_artifact

    if gpu_settings.no_compile:
        gpu_record.data["compile"] = "reused"
        path = build_directory(artifact, "cuda") / BUILD_RECORD
        if not path.is_file():
            pytest.fail(f"--gpu-no-compile: no cuda build at {path.parent}", pytrace=False)
        return json.loads(path.read_text())
    log: list[str] = []
    started = time.time()
    try:
        build = compile_artifact(artifact, "cuda", log=log.append)
    except Exception as exc:
        last = (str(exc).strip().splitlines() or log[-1:] or ["no output"])[-1]
        gpu_record.data["compile"] = {"error": last}
        pytest.fail(f"edgert compile --target cuda failed: {last}", pytrace=False)
    gpu_record.data["compile"] = {"seconds": round(time.time() - started, 1),
                                  "cuda_kernels": build.get("cuda_kernels"),
                                  "notes": build.get("notes", []), "files": build["files"]}
    return build


@pytest.fixture(scope="module")
def engines(artifact, cuda_build, gpu_record) -> dict:
    """The three backends over the artifact (a load error is recorded; the CPU reference's is
    fatal)."""
    import edgert
    from edgert.errors import EdgertError

    loaded = {}
    for name, kwargs in BACKENDS.items():
        row = gpu_record.backend(name)
        try:
            started = time.time()
            loaded[name] = edgert.load(artifact, **kwargs)
            row["load_s"] = round(time.time() - started, 1)
        except EdgertError as exc:
            row["error"] = str(exc)
    if "tvm_cuda" in loaded:
        gpu_record.backend("tvm_cuda")["kv_cache"] = type(loaded["tvm_cuda"].cache).__name__
    if "ort_cpu" not in loaded:
        pytest.fail(f"ONNX Runtime on the CPU cannot load {artifact}: "
                    f"{gpu_record.backend('ort_cpu')['error']}", pytrace=False)
    yield loaded
    loaded.clear()


def long_prompt(engine, min_tokens: int) -> str:
    prompts = json.loads((ROOT / "bench" / "prompts.json").read_text())
    text, i = "", 0
    while len(engine.tokenizer.encode_raw(text)) <= min_tokens:
        text += prompts[i % len(prompts)]["prompt"] + " "
        i += 1
    return text


class Runs:
    """Each (backend, mode) decoded once, on first use: ids kept here, figures in the record
    (``backends.NAME.MODE``)."""

    def __init__(self, engines: dict, prompts: list[str], new_tokens: int, record) -> None:
        self.engines, self.prompts, self.new_tokens, self.record = (engines, prompts,
                                                                    new_tokens, record)
        self._ids: dict[tuple[str, str], list | None] = {}
        self._dhsa_text: str | None = None

    @property
    def reference(self):
        return self.engines["ort_cpu"]

    def supports(self, mode: str) -> str | None:
        """None, or why the artifact has no such mode."""
        if mode == "medusa" and not self.reference.has_medusa:
            return "the artifact has no Medusa heads"
        if mode == "dhsa" and not self.reference.dhsa:
            return "the artifact has no DHSA prefill (exported without --dhsa)"
        return None

    def ids(self, name: str, mode: str):
        """The run's output ids (a list per prompt; dhsa: one list), or None after an error
        (the record's ``error``)."""
        from edgert.errors import EdgertError

        if (name, mode) not in self._ids:
            row = self.record.backend(name)
            try:
                ids, row[mode] = (self._dhsa(name) if mode == "dhsa"
                                  else self._decode(name, mode == "medusa"))
            except EdgertError as exc:
                ids, row[mode] = None, {"error": str(exc)}
            self._ids[name, mode] = ids
        return self._ids[name, mode]

    def error(self, name: str, mode: str) -> str | None:
        return self.record.backend(name).get(mode, {}).get("error")

    def _decode(self, name: str, medusa: bool):
        engine = self.engines[name]
        engine.generate("warm up", max_new_tokens=4, medusa=medusa)
        ids, tokens, elapsed, decode, accepted = [], 0, 0.0, [], []
        for prompt in self.prompts:
            t0 = time.perf_counter()
            result = engine.generate(prompt, max_new_tokens=self.new_tokens, medusa=medusa)
            elapsed += time.perf_counter() - t0
            ids.append(result.output_ids)
            tokens += len(result.output_ids)
            decode.append(result.stats["decode_tokens_per_s"])
            accepted.append(result.stats["mean_accepted"])
        row = {"tokens_per_s": round(tokens / elapsed, 1),
               "decode_tokens_per_s": round(float(np.median(decode)), 1)}
        if medusa:
            row["mean_accepted"] = round(float(np.mean(accepted)), 2)
        return ids, row

    def _dhsa(self, name: str):
        if self._dhsa_text is None:
            self._dhsa_text = long_prompt(self.reference, self.reference.dhsa.min_context)
        t0 = time.perf_counter()
        result = self.engines[name].generate(self._dhsa_text, max_new_tokens=DHSA_NEW_TOKENS,
                                             chat=False, dhsa=True, medusa=False)
        return result.output_ids, {"prefill_ms": round(result.stats["prefill_ms"], 1),
                                   "seconds": round(time.perf_counter() - t0, 2)}


@pytest.fixture(scope="module")
def runs(engines, gpu_settings, gpu_record) -> Runs:
    prompts = json.loads((ROOT / "bench" / "prompts.json").read_text())[:gpu_settings.prompts]
    return Runs(engines, [p["prompt"] for p in prompts], gpu_settings.new_tokens, gpu_record)


def test_compile_cuda(cuda_build):
    from edgert.artifact.tvm_build import DECODER, KV_COMMIT, library

    assert {library(DECODER), library(KV_COMMIT)} <= set(cuda_build["files"])


def test_tvm_cuda_loads(engines, gpu_record):
    assert "tvm_cuda" in engines, (
        f"the TVM cuda backend did not load: {gpu_record.backend('tvm_cuda').get('error')}")


@pytest.mark.parametrize("mode", ["greedy", "medusa"])
def test_tvm_cuda_decodes(runs, mode):
    if "tvm_cuda" not in runs.engines:
        pytest.skip("the TVM cuda backend did not load (test_tvm_cuda_loads)")
    if reason := runs.supports(mode):
        pytest.skip(reason)
    ids = runs.ids("tvm_cuda", mode)
    assert ids is not None, f"TVM cuda, {mode}: {runs.error('tvm_cuda', mode)}"
    assert len(ids) == len(runs.prompts) and all(ids), f"TVM cuda, {mode}: no tokens"


@pytest.mark.parametrize("mode", ["greedy", "medusa", "dhsa"])
@pytest.mark.parametrize("backend", ["tvm_cuda", "ort_cuda"])
def test_identical_to_ort_cpu(runs, backend, mode):
    if backend not in runs.engines:
        pytest.skip(f"{backend} did not load: {runs.record.backend(backend).get('error')}")
    if reason := runs.supports(mode):
        pytest.skip(reason)
    want = runs.ids("ort_cpu", mode)
    if want is None:
        pytest.skip(f"ONNX Runtime on the CPU, {mode}: {runs.error('ort_cpu', mode)}")
    got = runs.ids(backend, mode)
    if got is None:
        if backend == "tvm_cuda" and mode != "dhsa":
            pytest.skip(f"TVM cuda, {mode} failed (test_tvm_cuda_decodes)")
        pytest.xfail(f"{backend}, {mode} (reported, not a failure): {runs.error(backend, mode)}")
    row = runs.record.backend(backend)[mode]
    if mode == "dhsa":
        row["identical_to_ort_cpu"] = identical = got == want
        if not identical:
            pytest.xfail(f"{backend}, DHSA prefill: not token-identical to ONNX Runtime on the "
                         "CPU (reported, not a failure)")
        return
    row["identical_to_ort_cpu"] = same = sum(a == b for a, b in zip(got, want))
    row["prompts"] = len(want)
    if same < len(want):
        pytest.xfail(f"{backend}, {mode}: {same} of {len(want)} prompts token-identical to "
                     "ONNX Runtime on the CPU (reported, not a failure)")
