"""Manifest round trip, hash verification, corrupt/missing/truncated artifacts, atomic export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgert
from edgert.artifact.io import load_manifest, read_manifest
from edgert.artifact.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest
from edgert.errors import ArtifactError, ConfigError


@pytest.fixture()
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_artifact, dst)
    return dst


def test_manifest_round_trip(tiny_artifact):
    manifest = read_manifest(tiny_artifact)
    data = json.loads((tiny_artifact / MANIFEST_NAME).read_text())
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert manifest.to_dict() == data
    assert manifest.config.rope_theta == 10000.0 and "rope_theta" in data["config"]
    assert set(manifest.files) == {"model.onnx", "model.ort.onnx", "model.onnx.data",
                                   "tokenizer.json"}


def test_hashes_verified(tiny_artifact):
    load_manifest(tiny_artifact, verify=True)


def test_modified_file_is_detected(artifact_copy):
    with open(artifact_copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="SHA-256"):
        edgert.load(artifact_copy)


def test_a_load_samples_large_files_and_verify_reads_every_byte(artifact_copy, monkeypatch):
    """Files over QUICK_FULL_HASH_BYTES are checked at load by size and sampled digest; a
    byte changed between the samples is found by the full check (``edgert verify``)."""
    from edgert.artifact import io
    from edgert.artifact.io import quick_checks, update_manifest

    monkeypatch.setattr(io, "QUICK_FULL_HASH_BYTES", 1024)
    monkeypatch.setattr(io, "SAMPLE_BYTES", 64)
    data = artifact_copy / "model.onnx.data"
    update_manifest(artifact_copy, {"file_checks": quick_checks(artifact_copy,
                                                                ["model.onnx.data"])})
    size = data.stat().st_size
    between = (size - 64) // 30  # past window 0's 64 bytes, before window 1 at size/15
    with open(data, "r+b") as f:
        f.seek(between)
        byte = f.read(1)
        f.seek(between)
        f.write(bytes([byte[0] ^ 0xFF]))
    load_manifest(artifact_copy)  # the quick check does not read that byte
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_manifest(artifact_copy, verify="full")
    with open(data, "r+b") as f:  # the first bytes are sampled
        f.write(bytes([f.read(1)[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="sampled SHA-256"):
        edgert.load(artifact_copy)
    with pytest.raises(ConfigError, match="'quick' or 'full'"):
        load_manifest(artifact_copy, verify="sometimes")


def test_verify_command(artifact_copy):
    from click.testing import CliRunner

    from edgert.cli import main

    result = CliRunner().invoke(main, ["verify", str(artifact_copy)])
    assert result.exit_code == 0 and "match their SHA-256" in result.output
    with open(artifact_copy / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    result = CliRunner().invoke(main, ["verify", str(artifact_copy)])
    assert result.exit_code == 1 and "error:" in result.output


def test_truncated_weights_are_detected(artifact_copy):
    data = artifact_copy / "model.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(ArtifactError, match="corrupt, truncated or modified"):
        edgert.load(artifact_copy)


def test_missing_file_is_detected(artifact_copy):
    (artifact_copy / "model.ort.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        edgert.load(artifact_copy)


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        edgert.load(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="no edgert.json"):
        edgert.load(tmp_path)


def test_corrupt_manifest(artifact_copy):
    (artifact_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        edgert.load(artifact_copy)


def test_wrong_format_version(artifact_copy):
    path = artifact_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format version"):
        edgert.load(artifact_copy)


def test_unknown_manifest_field(artifact_copy):
    path = artifact_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["surprise"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="surprise"):
        edgert.load(artifact_copy)


def test_corrupt_graph_without_verification(artifact_copy, monkeypatch):
    # no session cache: an earlier load of the same (hash-named) graph would be served from
    # it, never reading the damaged file
    monkeypatch.setenv("EDGERT_ORT_CACHE", "0")
    (artifact_copy / "model.ort.onnx").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="re-export"):
        edgert.load(artifact_copy, verify=False)


def test_export_refuses_existing_directory(tiny_dir, tiny_artifact):
    from edgert.errors import EdgertError
    from edgert.export.exporter import export_model

    with pytest.raises(EdgertError, match="already exists"):
        export_model(str(tiny_dir), tiny_artifact, log=lambda m: None)


KILLABLE_EXPORT = """
import sys, time
from pathlib import Path
import edgert.export.exporter as ex
original = ex.save_graphs_sharing_weights
def slow_save(graphs, directory, data_name):
    written = original(graphs, directory, data_name)
    Path(sys.argv[3]).write_text("weights written")
    time.sleep(60)
    return written
ex.save_graphs_sharing_weights = slow_save
ex.export_model(sys.argv[1], Path(sys.argv[2]), ex.ExportOptions(max_context=64),
                log=lambda m: None)
"""


def test_interrupted_export_leaves_nothing_that_loads(tiny_dir, tmp_path):
    out = tmp_path / "killed"
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_EXPORT, str(tiny_dir), str(out),
                             str(ready)])
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None, "export exited before the kill point"
            assert time.time() < deadline, "export never reached the kill point"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed.tmp-")]
    assert leftovers, "the partial export should be in a temporary directory"
    with pytest.raises(ArtifactError):
        edgert.load(tmp_path / leftovers[0])
    # the next export into the same place removes what the killed one left, and succeeds
    from edgert.export.exporter import ExportOptions, export_model

    export_model(str(tiny_dir), out, ExportOptions(max_context=64), log=lambda m: None)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".killed.tmp-")]
    assert edgert.load(out).generate("hi", max_new_tokens=2).output_ids


def test_stale_temporaries_of_live_or_foreign_writers_stay(tmp_path):
    """Only directories of this artifact whose process is gone are removed: a live writer's
    (this process) and other names stay."""
    from edgert.artifact.io import remove_stale_temporaries

    target = tmp_path / "art"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    dead = int(done.stdout)
    stale = tmp_path / f".art.tmp-{dead}-x1"
    live = tmp_path / f".art.tmp-{os.getpid()}-x2"
    other = tmp_path / f".other.tmp-{dead}-x3"
    old = tmp_path / f".art.old-{dead}"
    for d in (stale, live, other, old):
        d.mkdir()
        (d / "model.onnx.data").write_bytes(b"x" * 100)
    assert sorted(p.name for p in remove_stale_temporaries(target)) == sorted(
        [stale.name, old.name])
    assert live.exists() and other.exists() and not stale.exists() and not old.exists()
