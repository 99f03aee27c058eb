"""``edgert tune``: the database, resuming, compile applying it, the RPC path."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import edgert  # noqa: E402
from edgert.passes.build import compile_artifact  # noqa: E402
from edgert.passes.tuning.database import TuningDatabase, TuningRecord  # noqa: E402
from edgert.passes.tuning.tuner import RPCSpec, TuneOptions, tune_artifact  # noqa: E402

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def tuned(tiny_medusa_artifact, tmp_path_factory):
    """The tiny artifact (with heads) tuned with a handful of trials per kernel, compiled."""
    art = tmp_path_factory.mktemp("tuned") / "artifact"
    shutil.copytree(tiny_medusa_artifact, art)
    summary = tune_artifact(art, "llvm", TuneOptions(trials=3, number=1, repeat=2, **QUIET))
    return art, summary


def test_database_round_trip_and_best(tmp_path):
    db = TuningDatabase.load(tmp_path)
    db.add(TuningRecord("w", "matmul", "knobs", {"bn": 8, "mb": 1}, 2.0))
    db.add(TuningRecord("w", "matmul", "knobs", {"bn": 16, "mb": 1}, 1.0))
    db.add(TuningRecord("w", "matmul", "knobs", {"bn": 32, "mb": 1}, math.inf, error="boom"))
    db.save()
    again = TuningDatabase.load(tmp_path)
    assert again.best("w").knobs == {"bn": 16, "mb": 1}
    assert again.measured("w", {"bn": 32, "mb": 1}) and not again.measured("w", {"bn": 64})
    assert math.isinf(again.trials("w")[2].latency_ms)


def test_corrupt_database_is_named(tmp_path):
    (tmp_path / "tuning.json").write_text("{not json")
    with pytest.raises(edgert.ArtifactError, match="tuning.json is not a tuning database"):
        TuningDatabase.load(tmp_path)


def test_tune_records_every_kernel_and_compile_applies_it(tuned):
    art, summary = tuned
    db = TuningDatabase.load(art / "tvm" / "llvm")
    assert {"matmul", "tree_attention"} == {r.kernel for r in db.records}
    for row in summary.values():
        assert row["trials"] == 3 and row["best_ms"] <= row["untuned_ms"]
    record = json.loads((art / "edgert.json").read_text())["compiled"]["llvm"]
    assert record["tuned"] == {w: db.best(w).knobs for w in db.workloads()}


def test_tuned_module_decodes_like_ort(tuned):
    art, _ = tuned
    for medusa in (False, True):
        want = edgert.load(art).generate("tuned kernels", max_new_tokens=24, medusa=medusa,
                                         ignore_eos=True).output_ids
        got = edgert.load(art, backend="tvm").generate("tuned kernels", max_new_tokens=24,
                                                       medusa=medusa, ignore_eos=True)
        assert got.output_ids == want


def test_tuning_resumes_without_measuring_again(tuned):
    art, _ = tuned
    before = len(TuningDatabase.load(art / "tvm" / "llvm").records)
    tune_artifact(art, "llvm", TuneOptions(trials=3, **QUIET), compile_after=False)
    assert len(TuningDatabase.load(art / "tvm" / "llvm").records) == before


def test_recompiling_reproduces_the_tuned_module_without_tuning(tuned):
    art, _ = tuned
    db = TuningDatabase.load(art / "tvm" / "llvm")
    records = len(db.records)
    first = json.loads((art / "edgert.json").read_text())["compiled"]["llvm"]
    compile_artifact(art, "llvm", **QUIET)
    second = json.loads((art / "edgert.json").read_text())["compiled"]["llvm"]
    assert second["tuned"] == first["tuned"]
    assert len(TuningDatabase.load(art / "tvm" / "llvm").records) == records  # kept, unchanged


def test_time_budget_stops_and_saves(tiny_artifact, tmp_path):
    art = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, art)
    tune_artifact(art, "llvm", TuneOptions(trials=50, time_budget=0.0, **QUIET),
                  compile_after=False)
    db = TuningDatabase.load(art / "tvm" / "llvm")
    assert len(db.records) <= 1  # the budget is checked before each trial


def test_unknown_kernel_and_bad_tracker_are_named(tiny_artifact):
    with pytest.raises(edgert.EdgertError, match="unknown kernel"):
        tune_artifact(tiny_artifact, "llvm", TuneOptions(kernels=["conv"], **QUIET))
    with pytest.raises(edgert.EdgertError, match="HOST:PORT"):
        RPCSpec.parse("localhost", "k")


def test_rpc_tuning_through_a_local_tracker(tiny_artifact, tmp_path):
    """The device-farm path: a tracker and an RPC server on 127.0.0.1, kernels measured on
    the server."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=19190, port_end=19290, silent=True)
    server = rpc.Server(host="127.0.0.1", port=19300, port_end=19400, key="edgert-test",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        art = tmp_path / "artifact"
        shutil.copytree(tiny_artifact, art)
        spec = RPCSpec("127.0.0.1", tracker.port, "edgert-test")
        summary = tune_artifact(art, "llvm", TuneOptions(trials=2, number=1, repeat=1,
                                                         kernels=["tree_attention"], rpc=spec,
                                                         **QUIET), compile_after=False)
        db = TuningDatabase.load(art / "tvm" / "llvm")
        assert db.target["device"].startswith("rpc:edgert-test@127.0.0.1")
        assert all(np.isfinite(r.latency_ms) and r.latency_ms > 0 for r in db.records)
        assert len(summary) == 1
    finally:
        server.terminate()
        tracker.terminate()


def test_dhsa_kernel_is_tuned_for_artifacts_with_dhsa(tiny_dhsa_artifact, tmp_path):
    art = tmp_path / "artifact"
    shutil.copytree(tiny_dhsa_artifact, art)
    summary = tune_artifact(art, "llvm", TuneOptions(trials=2, kernels=["dhsa_attention"],
                                                     **QUIET))
    (name,) = summary
    assert name.startswith("dhsa_attention_") and summary[name]["trials"] == 2
    record = json.loads((art / "edgert.json").read_text())["compiled"]["llvm"]
    assert name in record["tuned"]
    engine = edgert.load(art, backend="tvm")
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    assert engine.generate(text, max_new_tokens=4, chat=False).stats["prefill"] == "dhsa"
