"""Session-creation failures are classified (#24): out of memory, the execution provider, a
session option, a damaged graph; each one line, typed, with the fix; bad --threads refused
before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgert
from edgert.errors import ArtifactError, BackendError, ConfigError
from edgert.runtime.backends.ort import session_error

GRAPH = Path("artifact/model.ort.onnx")


@pytest.mark.parametrize("exc, kind, words", [
    (MemoryError(), BackendError, "out of memory"),
    (RuntimeError("std::bad_alloc"), BackendError, "out of memory"),
    (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during "
                  "initialization: Failed to allocate memory for requested buffer of size 9"),
     BackendError, "out of memory"),
    (RuntimeError("EP Error: CUDA failure 100: no CUDA-capable device is detected"),
     BackendError, "execution provider"),
    (RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid value for "
                  "intra_op_num_threads"), ConfigError, "session option"),
    (RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from x failed:"
                  "Protobuf parsing failed."), ArtifactError, "corrupt, re-export"),
])
def test_session_errors_are_classified(exc, kind, words):
    error = session_error(exc, GRAPH, "cuda")
    assert type(error) is kind
    assert words in str(error) and "\n" not in str(error)


def test_a_damaged_graph_is_an_artifact_error(artifact_copy_factory):
    art = artifact_copy_factory()
    (art / "model.ort.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ArtifactError, match="re-export"):
        edgert.load(art, verify=False)


@pytest.mark.parametrize("threads", [-1, 1.5, "2", True])
def test_bad_threads_refused_up_front(tiny_artifact, threads):
    with pytest.raises(ConfigError, match="threads must be an integer >= 0"):
        edgert.load(tiny_artifact, threads=threads)


@pytest.fixture()
def artifact_copy_factory(tiny_artifact, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("EDGERT_ORT_CACHE", "0")  # read the damaged file, not a cached copy
    return lambda: Path(shutil.copytree(tiny_artifact, tmp_path / "copy"))
