"""The int8-activation decode graph pads a lone row's attention to two rows (row_padding)."""

import json
import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper

import edgert
from edgert.artifact.manifest import GraphKey
from edgert.export.row_padding import pad_lone_attention_rows
from edgert.runtime.backends import StepInputs
from edgert.runtime.steps import causal_mask

PROMPT_IDS = [5, 17, 42, 99, 7, 3, 250, 11, 64, 8]


@pytest.fixture(scope="module")
def int8_artifact(tiny_dir, tmp_path_factory):
    from edgert.export.exporter import ExportOptions, export_model
    from edgert.export.quantize import WeightOptions

    return export_model(str(tiny_dir), tmp_path_factory.mktemp("pad") / "q4",
                        ExportOptions(max_context=128, weights=WeightOptions("q4", "int8")),
                        log=lambda m: None)


def _step(ids: list[int], past: int) -> StepInputs:
    q = len(ids)
    return StepInputs(np.array([ids], dtype=np.int64),
                      np.arange(past, past + q, dtype=np.int64)[None],
                      causal_mask(q), np.arange(q, dtype=np.int64), past)


def _fill(engine, n: int) -> None:
    """The cache holds the first ``n`` prompt ids (wrapped), committed."""
    ids = (PROMPT_IDS * (n // len(PROMPT_IDS) + 1))[:n]
    engine.cache.reset()
    engine.backend.forward(_step(ids, 0))
    engine.cache.advance(n)


def _row0(engine, ids: list[int]):
    """Row 0's logits, hidden state and K/V entries of a forward of ``ids`` at the end of the
    cache (not committed)."""
    past = engine.cache.length
    out = engine.backend.forward(_step(ids, past))
    entries = [buf[:, :, past].copy() for buf in engine.cache.buffers()]
    return out.logits[0].copy(), out.hidden[0].copy(), entries


def test_int8_artifact_pads_lone_rows_and_decodes_one_row(int8_artifact):
    engine = edgert.load(int8_artifact)
    assert engine.manifest.graphs[GraphKey.ORT_GQA].min_attention_rows == 2
    assert engine.row_exact and engine.decode_rows == 1


@pytest.mark.parametrize("past", [1, 10, 37])
def test_a_lone_row_equals_row_0_of_a_two_row_forward_bit_for_bit(int8_artifact, past):
    """What makes one-row plain steps lossless against multi-row verification: the same
    token, alone or followed by another row, gets the same logits, hidden state and K/V."""
    engine = edgert.load(int8_artifact)
    _fill(engine, past)
    alone = _row0(engine, [123])
    for follower in (123, 77):
        pair = _row0(engine, [123, follower])
        np.testing.assert_array_equal(alone[0], pair[0])
        np.testing.assert_array_equal(alone[1], pair[1])
        for a, b in zip(alone[2], pair[2]):
            np.testing.assert_array_equal(a, b)


def test_the_last_free_slot_runs_one_row_unpadded(int8_artifact):
    """No room for the copy's entry: the graph pads nothing and writes nothing past the
    cache."""
    engine = edgert.load(int8_artifact)
    capacity = engine.cache.capacity
    _fill(engine, capacity - 1)
    out = engine.backend.forward(_step([123], capacity - 1))
    assert out.logits.shape[0] == 1 and np.isfinite(out.logits).all()


def test_generation_matches_two_row_steps(int8_artifact):
    """One-row plain steps on the padded graph give the tokens two-row steps give."""
    engine = edgert.load(int8_artifact)
    one = engine.generate("the cat sat", max_new_tokens=30, speculative="off").output_ids
    engine.decode_rows = 2
    two = engine.generate("the cat sat", max_new_tokens=30, speculative="off").output_ids
    assert one == two


def test_an_artifact_without_padding_decodes_two_row_steps(int8_artifact, tmp_path):
    """Artifacts exported before the rewrite (no ``min_attention_rows``) keep two-row steps."""
    copy = shutil.copytree(int8_artifact, tmp_path / "old")
    manifest = json.loads((copy / "edgert.json").read_text())
    del manifest["graphs"][GraphKey.ORT_GQA]["min_attention_rows"]
    (copy / "edgert.json").write_text(json.dumps(manifest))
    engine = edgert.load(copy)
    assert engine.row_exact and engine.decode_rows == 2


def test_attention_with_in_node_rotary_is_left_alone():
    """GroupQueryAttention that applies rotary itself reads positions the rewrite does not
    pad: the graph stays as it is."""
    node = helper.make_node("GroupQueryAttention",
                            ["q", "k", "v", "pk", "pv", "sl", "tot", "cos", "sin"], ["o"],
                            domain="com.microsoft", num_heads=2, kv_num_heads=1, do_rotary=1)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("q", "k", "v", "pk", "pv", "cos", "sin")],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    before = model.SerializeToString()
    assert not pad_lone_attention_rows(model)
    assert model.SerializeToString() == before
