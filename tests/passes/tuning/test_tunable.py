"""Which workloads an artifact tunes (its weights' formats decide the matmul kernels), and a
quantized matmul workload measured for real."""

from __future__ import annotations

import dataclasses

import pytest

tvm = pytest.importorskip("tvm")

from edgert.artifact.io import load_manifest  # noqa: E402
from edgert.passes.fuse_parallel_matmuls import decoder_matmul_shapes  # noqa: E402
from edgert.passes.tuning.tunable import TuneScope, workloads_for  # noqa: E402
from edgert.passes.tuning.tuner import LocalDevice, measure  # noqa: E402

Q4_GROUPS = {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4, "gate_proj": 4,
             "up_proj": 4, "down_proj": 4, "vocab": 8, "medusa_heads": 8}


@pytest.fixture(scope="module")
def scope(tiny_artifact):
    return TuneScope.from_manifest(load_manifest(tiny_artifact))


def names(scope, kernel):
    return sorted(w.name for w in workloads_for(scope, [kernel]))


def test_fp32_artifact_tunes_fp32_matmuls_only(scope):
    assert scope.bits == {}
    assert names(scope, "quant_matmul") == []
    h = scope.config.hidden_size
    want = {f"matmul_{k}_{n}" for k, n in decoder_matmul_shapes(scope.config)} | {
        f"matmul_{h}_{h}"}
    assert set(names(scope, "matmul")) == want


def test_quantized_artifact_tunes_each_group_at_its_bits(scope):
    quantized = dataclasses.replace(scope, bits=Q4_GROUPS)
    assert names(quantized, "matmul") == []
    qkv, o, gate_up, down, vocab = decoder_matmul_shapes(scope.config)
    h = scope.config.hidden_size
    want = {f"quant_matmul4_{k}_{n}" for k, n in (qkv, o, gate_up, down)} | {
        f"quant_matmul8_{vocab[0]}_{vocab[1]}", f"quant_matmul8_{h}_{h}"}
    assert set(names(quantized, "quant_matmul")) == want
    # a group left in fp32 (say the vocab) is tuned as an fp32 matmul
    mixed = dataclasses.replace(scope, bits={g: b for g, b in Q4_GROUPS.items() if g != "vocab"})
    assert names(mixed, "matmul") == [f"matmul_{vocab[0]}_{vocab[1]}"]


def test_a_quantized_workload_is_measured(scope):
    import numpy as np

    workload = workloads_for(dataclasses.replace(scope, bits=Q4_GROUPS), ["quant_matmul"])[0]
    inputs = workload.inputs(np.random.default_rng(0))
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    for knobs in workload.space[:2]:
        assert measure(workload, knobs, target, LocalDevice(), inputs, 1, 1) > 0


def test_8bit_groups_of_an_fp32_compute_artifact_are_fp32_matmuls(tiny_artifact):
    """At --compute fp32 the export expands 8-bit weights (the vocab, the heads) to fp32 in
    the graph: TVM sees fp32 matmuls there."""
    manifest = load_manifest(tiny_artifact)
    groups = {name: {"bits": bits} for name, bits in Q4_GROUPS.items()}
    for compute, vocab_bits in (("int8", 8), ("fp32", None)):
        quantized = dataclasses.replace(manifest, quantization={"compute": compute,
                                                                "groups": groups})
        scope = TuneScope.from_manifest(quantized)
        assert scope.bits.get("vocab") == vocab_bits and scope.bits["q_proj"] == 4


def test_a_wrong_candidate_is_discarded(scope, tmp_path):
    """A candidate whose output differs from the untuned kernel's (here: a knob setting whose
    packing is broken) is recorded with its error and never chosen, however fast."""
    import numpy as np

    from edgert.passes.tuning.database import TuningDatabase
    from edgert.passes.tuning.tuner import TuneOptions, tune

    workload = workloads_for(scope, ["matmul"])[0]
    broken = workload.space[1]
    real_prepare = workload.prepare

    def prepare(knobs, args):
        prepared = real_prepare(knobs, args)
        if knobs == broken:  # a "schedule" that reads a zero weight: fast and wrong
            prepared[1] = np.zeros_like(prepared[1])
        return prepared

    bad = dataclasses.replace(workload, prepare=prepare, space=workload.space[:3])
    database = TuningDatabase.load(tmp_path)
    logged = []
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    tune([bad], database, target, TuneOptions(trials=3, number=1, repeat=1,
                                              log=logged.append))
    records = {tuple(sorted(r.knobs.items())): r for r in database.trials(bad.name)}
    wrong = records[tuple(sorted(bad.knobs_dict(broken).items()))]
    assert wrong.error.startswith("wrong output") and wrong.latency_ms == float("inf")
    assert database.best(bad.name).knobs != bad.knobs_dict(broken)
    assert any("discarded" in line for line in logged)
