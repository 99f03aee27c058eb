"""The exported DHSA prefill graph against the NumPy reference and against dense prefill."""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgert
from edgert.dhsa import reference
from edgert.dhsa.params import DHSAParams
from edgert.export.attention import fix_contrib_optional_inputs
from edgert.export.dhsa_attention import DHSACore
from edgert.model.config import DecoderConfig

ATOL = 2e-6  # float32 reordering only: the same keys are selected
SMALL = DHSAParams(block_size=16, budget=48, local=16, sink=4, dense_tail=8, probe_stride=8,
                   min_context=64, early_layers=0)
CFG = DecoderConfig(vocab_size=10, hidden_size=64, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


class CoreOnly(nn.Module):
    """One layer's DHSA core as a graph: one prefill call against a cache."""

    def __init__(self, params: DHSAParams) -> None:
        super().__init__()
        self.core = DHSACore(CFG, 0, dhsa=params)

    def forward(self, query, key, value, past_k, past_v, fixed, prompt_len, past_starts):
        ctx = {"fixed_chunk": fixed, "prompt_len": prompt_len, "past_starts": past_starts,
               "starts": None}
        out = self.core(query, key, value, past_k, past_v, ctx)[0]
        return out, ctx["starts"]


def export_core(params: DHSAParams) -> ort.InferenceSession:
    buf = io.BytesIO()
    q0 = params.budget + params.block_size + 3
    p0 = 2 * params.block_size if params.local >= params.block_size else 0  # general: one call
    cache = torch.zeros(1, 2, p0 + q0 + 2, 16)
    example = (torch.zeros(1, q0, 64), torch.zeros(1, q0, 32), torch.zeros(1, q0, 32), cache,
               cache, torch.tensor(0), torch.tensor(p0 + q0), torch.ones(p0, dtype=torch.bool))
    axes = {n: {1: "q"} for n in ("query", "key", "value", "out")}
    axes.update({"past_k": {2: "C"}, "past_v": {2: "C"}, "past_starts": {0: "P"},
                 "starts": {0: "q"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(CoreOnly(params).eval(), example, buf,
                          input_names=["query", "key", "value", "past_k", "past_v", "fixed",
                                       "prompt_len", "past_starts"],
                          output_names=["out", "starts"], dynamic_axes=axes,
                          opset_version=17, dynamo=False, custom_opsets={"com.microsoft": 1})
    proto = onnx.load_from_string(buf.getvalue())
    fix_contrib_optional_inputs(proto.graph)
    return ort.InferenceSession(proto.SerializeToString())


@pytest.fixture(scope="module")
def core_session():
    """local >= block_size: blocks attend to their own keys plus selected earlier ones."""
    return export_core(SMALL)


CHUNKED = dataclasses.replace(SMALL, prefill_chunk=64)  # calls of 64 tokens (4 blocks)
GENERAL = dataclasses.replace(SMALL, local=8, sink=2, prefill_chunk=0)  # the masked form


def random_qkv(seq_len, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((4, seq_len, 16)).astype(np.float32),
            rng.standard_normal((2, seq_len, 16)).astype(np.float32),
            rng.standard_normal((2, seq_len, 16)).astype(np.float32))


def run_core(session, q, k, v, fixed, params):
    """The prompt through the core graph call by call, as the runtime does: the K/V of each
    call go into a fixed cache, the chunk starts into the next call's past_chunk_starts.
    Returns (out [Hq,T,D], starts [T])."""
    hq, t, d = q.shape
    capacity = t + 5
    cache_k = np.zeros((1, 2, capacity, d), np.float32)
    cache_v = np.zeros((1, 2, capacity, d), np.float32)
    cache_k[0, :, :t], cache_v[0, :, :t] = k, v  # only [0, start) may be read by a call
    starts = np.zeros(t, bool)
    out = np.zeros((t, hq * d), np.float32)
    for start, end in reference.prefill_calls(t, params):
        visible_k, visible_v = cache_k.copy(), cache_v.copy()
        visible_k[:, :, start:], visible_v[:, :, start:] = np.nan, np.nan
        rows = slice(start, end)
        out[rows], starts[rows] = session.run(None, {
            "query": q[:, rows].transpose(1, 0, 2).reshape(1, end - start, hq * d),
            "key": k[:, rows].transpose(1, 0, 2).reshape(1, end - start, -1),
            "value": v[:, rows].transpose(1, 0, 2).reshape(1, end - start, -1),
            "past_k": visible_k, "past_v": visible_v,
            "fixed": np.array(fixed, dtype=np.int64), "prompt_len": np.array(t, np.int64),
            "past_starts": starts[:start].copy()})
    return out.reshape(t, hq, d).transpose(1, 0, 2), starts


@pytest.mark.parametrize("seq_len", [49, 100, 257])
def test_general_form_matches_reference(seq_len):
    session = export_core(GENERAL)
    q, k, v = random_qkv(seq_len, seq_len)
    expected, _, _ = reference.dhsa_attention(q, k, v, GENERAL)
    np.testing.assert_allclose(run_core(session, q, k, v, 0, GENERAL)[0], expected, atol=ATOL)


@pytest.mark.parametrize("seq_len", [49, 64, 65, 100, 150, 257])
@pytest.mark.parametrize("fixed", [0, 10])
def test_graph_matches_reference(core_session, seq_len, fixed):
    """One call over the whole prompt (prefill_chunk >= the prompt)."""
    q, k, v = random_qkv(seq_len, seq_len + fixed)
    params = dataclasses.replace(SMALL, fixed_chunk=fixed)
    expected, starts, _ = reference.dhsa_attention(q, k, v, params)
    out, got_starts = run_core(core_session, q, k, v, fixed, params)
    np.testing.assert_allclose(out, expected, atol=ATOL)
    np.testing.assert_array_equal(got_starts, starts)


@pytest.mark.parametrize("seq_len", [65, 76, 128, 135, 200, 257])
@pytest.mark.parametrize("fixed", [0, 10])
def test_chunked_calls_match_reference(core_session, seq_len, fixed):
    """Calls of 64 query tokens against the cache (the last merged when shorter than the
    dense tail: 135 = 64 + 71); NaN in the cache past each call's prefix proves a call reads
    nothing beyond it."""
    q, k, v = random_qkv(seq_len, 3 * seq_len + fixed)
    params = dataclasses.replace(CHUNKED, fixed_chunk=fixed)
    expected, starts, _ = reference.dhsa_attention(q, k, v, params)
    out, got_starts = run_core(core_session, q, k, v, fixed, params)
    np.testing.assert_allclose(out, expected, atol=ATOL)
    np.testing.assert_array_equal(got_starts, starts)


@pytest.mark.parametrize("seq_len", [65, 130, 200])
def test_calls_shorter_than_the_budget_match_reference(core_session, seq_len):
    """32-token calls under a 48-key budget: the first calls have fewer keys than the 32
    earlier slots (E < slots), attend to all of them, and still agree with the reference."""
    params = dataclasses.replace(SMALL, prefill_chunk=32)
    q, k, v = random_qkv(seq_len, 5 * seq_len)
    expected, starts, _ = reference.dhsa_attention(q, k, v, params)
    out, got_starts = run_core(core_session, q, k, v, 0, params)
    np.testing.assert_allclose(out, expected, atol=ATOL)
    np.testing.assert_array_equal(got_starts, starts)


def test_chunked_calls_with_probes_off_the_call_grid():
    """A probe stride (24) that does not divide the call length (64): each call finds its
    first probe row from its own offset."""
    params = dataclasses.replace(CHUNKED, probe_stride=24)
    session = export_core(params)
    q, k, v = random_qkv(230, 11)
    expected, starts, _ = reference.dhsa_attention(q, k, v, params)
    out, got_starts = run_core(session, q, k, v, 0, params)
    np.testing.assert_allclose(out, expected, atol=ATOL)
    np.testing.assert_array_equal(got_starts, starts)


@pytest.mark.parametrize("params", [dataclasses.replace(CHUNKED, per_kv_head=1),
                                    dataclasses.replace(GENERAL, per_kv_head=1)],
                         ids=["chunked", "general form"])
def test_per_kv_head_selection_matches_reference(params):
    """Each KV head selects its own keys: the graph gathers per head and agrees with the
    reference (whose selections per head differ on these inputs: 10-token chunks)."""
    session = export_core(params)
    params = dataclasses.replace(params, fixed_chunk=10)
    q, k, v = random_qkv(200, 21)
    expected, starts, sel = reference.dhsa_attention(q, k, v, params)
    assert sel.index.shape[0] == 2 and any(
        set(sel.keys(b, 0).tolist()) != set(sel.keys(b, 1).tolist())
        for b in range(sel.index.shape[1]))
    out, got_starts = run_core(session, q, k, v, 10, params)
    np.testing.assert_allclose(out, expected, atol=ATOL)
    np.testing.assert_array_equal(got_starts, starts)


def test_early_layers_select_their_own_budget():
    """A layer among ``early_layers`` computes the reference with ``early_budget`` keys per
    block (chunked calls), which differs from the base budget's result."""
    params = dataclasses.replace(CHUNKED, early_layers=1, early_budget=96)
    session = export_core(params)  # layer 0, the boundary layer: an early one
    q, k, v = random_qkv(200, 5)
    expected, starts, sel = reference.dhsa_attention(q, k, v, params.for_layer(0))
    assert sel.index.shape[-1] == 96
    out, got_starts = run_core(session, q, k, v, 0, params)
    np.testing.assert_allclose(out, expected, atol=ATOL)
    np.testing.assert_array_equal(got_starts, starts)
    narrow, _, _ = reference.dhsa_attention(q, k, v, CHUNKED)
    assert np.abs(narrow - out).max() > 1e-2


def test_centred_and_uncentred_keys_match_reference():
    """Keys with a common direction the queries share (where ``center_keys`` changes the
    selection): the graph agrees with the reference both ways, and the two ways differ."""
    q, k, v = random_qkv(200, 8)
    k += 2.0 * np.eye(16, dtype=np.float32)[0]
    q += 1.0 * np.eye(16, dtype=np.float32)[0]
    outs = []
    for center in (0, 1):
        params = dataclasses.replace(CHUNKED, fixed_chunk=0, center_keys=center)
        expected, starts, _ = reference.dhsa_attention(q, k, v, params)
        out, got_starts = run_core(export_core(params), q, k, v, 0, params)
        np.testing.assert_allclose(out, expected, atol=ATOL)
        np.testing.assert_array_equal(got_starts, starts)
        outs.append(out)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2


@pytest.mark.parametrize("params", [SMALL, CHUNKED], ids=["one call", "chunked"])
def test_graph_matches_reference_with_structured_boundaries(core_session, params):
    """Inputs with real attention-mass jumps, so the dynamic boundary rule fires."""
    seq_len, d = 160, 16
    rng = np.random.default_rng(5)
    q = rng.standard_normal((4, seq_len, d)).astype(np.float32) * 0.2
    k = rng.standard_normal((2, seq_len, d)).astype(np.float32) * 0.2
    v = rng.standard_normal((2, seq_len, d)).astype(np.float32)
    q[:, :, 0] += 3.0
    k[:, 40:60, 0] += 3.0
    k[:, 100:110, 0] += 3.0
    expected, starts, _ = reference.dhsa_attention(q, k, v, params)
    assert starts.sum() >= 3
    out, got_starts = run_core(core_session, q, k, v, 0, params)
    np.testing.assert_allclose(out, expected, atol=ATOL)
    np.testing.assert_array_equal(got_starts, starts)


def test_prompts_within_the_budget_prefill_densely(tiny_dhsa_artifact):
    """A prompt no longer than the budget selects every key (dense attention exactly): even
    with dhsa=True the runtime prefills it densely."""
    engine = edgert.load(tiny_dhsa_artifact)
    ids = np.random.default_rng(0).integers(3, 300, engine.dhsa.budget).tolist()
    assert not engine._use_dhsa(True, len(ids))
    assert engine._use_dhsa(True, len(ids) + 1)
    forced = engine.generate("short", dhsa=True, max_new_tokens=8)
    dense = engine.generate("short", dhsa=False, max_new_tokens=8)
    assert forced.stats["prefill"] == "dense" and forced.output_ids == dense.output_ids


def test_short_prompts_are_unchanged(tiny_dhsa_artifact):
    engine = edgert.load(tiny_dhsa_artifact)
    auto = engine.generate("Explain loops", max_new_tokens=24)
    dense = engine.generate("Explain loops", max_new_tokens=24, dhsa=False)
    assert auto.stats["prefill"] == "dense" and auto.output_ids == dense.output_ids


def test_long_prompts_use_dhsa(tiny_dhsa_artifact):
    engine = edgert.load(tiny_dhsa_artifact)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    result = engine.generate(text, max_new_tokens=8, chat=False)
    assert len(result.prompt_ids) > engine.dhsa.min_context
    assert result.stats["prefill"] == "dhsa"


def test_dhsa_requested_without_a_dhsa_graph_names_the_fix(tiny_artifact):
    """An artifact whose capacity is within the default min_context has no DHSA graph:
    dhsa=True is refused in one line naming the setting; the default prefills densely."""
    engine = edgert.load(tiny_artifact)
    assert not engine.backend.has_dhsa and engine.cache.capacity <= DHSAParams().min_context
    with pytest.raises(edgert.GenerationError, match="min_context"):
        engine.generate("hello", max_new_tokens=2, dhsa=True)
    assert engine.generate("hello", max_new_tokens=2).stats["prefill"] == "dense"


def test_dhsa_session_keeps_no_memory_pattern(tiny_dhsa_artifact):
    """Every DHSA call has its own input shapes; with ORT's memory pattern on, a repeated
    request length would allocate each recorded plan again (+100-200 MB at 8K). The decode
    session keeps it."""
    engine = edgert.load(tiny_dhsa_artifact)
    assert engine.backend.dhsa_session.get_session_options().enable_mem_pattern is False
    assert engine.backend.session.get_session_options().enable_mem_pattern is True


def _dense_and_sparse_prefill(engine, ids):
    """(logits, K/V of the prompt) after DHSA prefill and after dense prefill."""
    from edgert.runtime.steps import prefill, prefill_sparse

    results = []
    for run in (lambda: prefill_sparse(engine.backend, engine.cache, ids),
                lambda: prefill(engine.backend, engine.cache, ids, 512)):
        engine.cache.reset()
        out = run()
        results.append((out.logits, engine.cache.storage[..., :len(ids), :].copy()))
    return results


CHUNKED_TINY = DHSAParams(block_size=16, budget=64, local=16, sink=4, dense_tail=8,
                          probe_stride=8, min_context=128, prefill_chunk=64, early_layers=0)


def _tiny_dhsa_engine(tiny_dir, tmp_path, params: DHSAParams):
    """The tiny model exported with these DHSA parameters (512-token cache), loaded."""
    from edgert.export.exporter import ExportOptions, export_model

    export_model(str(tiny_dir), tmp_path / "art", ExportOptions(max_context=512, dhsa=params),
                 log=lambda m: None)
    return edgert.load(tmp_path / "art")


def test_chunked_prefill_of_dense_layers_equals_dense_prefill(tiny_dir, tmp_path):
    """With the boundary layer past the last layer every layer attends densely, so the
    chunked DHSA prefill (calls of 64 tokens against the cache) must give dense prefill's
    logits and K/V: the calls read the right prefix and land where they belong."""
    params = dataclasses.replace(CHUNKED_TINY, boundary_layer=2)
    engine = _tiny_dhsa_engine(tiny_dir, tmp_path, params)
    ids = np.random.default_rng(3).integers(3, 300, 260).tolist()
    assert len(reference.prefill_calls(len(ids), params)) == 4  # the last one merged: 68
    (sparse_logits, sparse_kv), (dense_logits, dense_kv) = _dense_and_sparse_prefill(engine, ids)
    np.testing.assert_allclose(sparse_logits, dense_logits, atol=1e-4)
    np.testing.assert_allclose(sparse_kv, dense_kv, atol=1e-4)


def test_exported_fixed_chunks_are_used(tiny_dir, tmp_path):
    """An artifact exported with ``--dhsa fixed_chunk=N`` prefills with N-token chunks (the
    graph takes the chunking as an input; the engine passes the manifest's)."""
    params = dataclasses.replace(CHUNKED_TINY, fixed_chunk=10)
    engine = _tiny_dhsa_engine(tiny_dir, tmp_path, params)
    assert engine.dhsa_fixed_chunk == 10
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    result = engine.generate(text, max_new_tokens=2, chat=False, dhsa=True)
    n = len(result.prompt_ids)
    assert result.stats["prefill"] == "dhsa" and n > params.budget
    expected = np.zeros(n, bool)
    expected[::10] = True
    np.testing.assert_array_equal(engine.backend._chunk_starts[:n], expected)


def test_chunked_sparse_prefill_fills_the_cache(tiny_dhsa_artifact):
    """Layer 0's K/V do not depend on attention: after the chunked sparse prefill they equal
    dense prefill's at every position; layer 1's differ (its inputs went through DHSA)."""
    engine = edgert.load(tiny_dhsa_artifact)
    ids = np.random.default_rng(4).integers(3, 300, 250).tolist()
    (_, sparse_kv), (_, dense_kv) = _dense_and_sparse_prefill(engine, ids)
    np.testing.assert_allclose(sparse_kv[0], dense_kv[0], atol=1e-5)
    assert np.abs(sparse_kv[1] - dense_kv[1]).max() > 1e-3
