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
from edgert.config import LlamaConfig
from edgert.dhsa import reference
from edgert.dhsa.params import DHSAParams
from edgert.export.attention import fix_contrib_optional_inputs
from edgert.export.dhsa_attention import DHSACore

ATOL = 2e-6  # float32 reordering only: the same keys are selected
SMALL = DHSAParams(block_size=16, budget=48, local=16, sink=4, dense_tail=8, probe_stride=8,
                   min_context=64)
CFG = LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


class CoreOnly(nn.Module):
    def __init__(self, params: DHSAParams) -> None:
        super().__init__()
        self.core = DHSACore(CFG, 0, dhsa=params)

    def forward(self, query, key, value, fixed):
        ctx = {"fixed_chunk": fixed, "starts": None}
        return self.core(query, key, value, None, None, ctx)[0]


def export_core(params: DHSAParams) -> ort.InferenceSession:
    buf = io.BytesIO()
    t0 = params.budget + params.block_size + 3
    example = (torch.zeros(1, t0, 64), torch.zeros(1, t0, 32), torch.zeros(1, t0, 32),
               torch.tensor(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(CoreOnly(params).eval(), example, buf,
                          input_names=["query", "key", "value", "fixed"], output_names=["out"],
                          dynamic_axes={n: {1: "T"} for n in ("query", "key", "value", "out")},
                          opset_version=17, dynamo=False, custom_opsets={"com.microsoft": 1})
    proto = onnx.load_from_string(buf.getvalue())
    fix_contrib_optional_inputs(proto.graph)
    return ort.InferenceSession(proto.SerializeToString())


@pytest.fixture(scope="module")
def core_session():
    """local >= block_size: blocks attend to their own keys plus selected earlier ones."""
    return export_core(SMALL)


GENERAL = dataclasses.replace(SMALL, local=8, sink=2)  # local < block_size: the masked form


@pytest.mark.parametrize("seq_len", [49, 100, 257])
def test_general_form_matches_reference(seq_len):
    session = export_core(GENERAL)
    rng = np.random.default_rng(seq_len)
    q = rng.standard_normal((4, seq_len, 16)).astype(np.float32)
    k = rng.standard_normal((2, seq_len, 16)).astype(np.float32)
    v = rng.standard_normal((2, seq_len, 16)).astype(np.float32)
    expected, _, _ = reference.dhsa_attention(q, k, v, GENERAL)
    np.testing.assert_allclose(run_core(session, q, k, v, 0), expected, atol=ATOL)


def run_core(session, q, k, v, fixed):
    hq, t, d = q.shape
    out = session.run(None, {"query": q.transpose(1, 0, 2).reshape(1, t, hq * d),
                             "key": k.transpose(1, 0, 2).reshape(1, t, -1),
                             "value": v.transpose(1, 0, 2).reshape(1, t, -1),
                             "fixed": np.array(fixed, dtype=np.int64)})[0]
    return out.reshape(t, hq, d).transpose(1, 0, 2)


@pytest.mark.parametrize("seq_len", [49, 64, 65, 100, 150, 257])
@pytest.mark.parametrize("fixed", [0, 10])
def test_graph_matches_reference(core_session, seq_len, fixed):
    rng = np.random.default_rng(seq_len + fixed)
    q = rng.standard_normal((4, seq_len, 16)).astype(np.float32)
    k = rng.standard_normal((2, seq_len, 16)).astype(np.float32)
    v = rng.standard_normal((2, seq_len, 16)).astype(np.float32)
    expected, _, _ = reference.dhsa_attention(q, k, v, dataclasses.replace(SMALL,
                                                                           fixed_chunk=fixed))
    np.testing.assert_allclose(run_core(core_session, q, k, v, fixed), expected, atol=ATOL)


def test_graph_matches_reference_with_structured_boundaries(core_session):
    """Inputs with real attention-mass jumps, so the dynamic boundary rule fires."""
    seq_len, d = 160, 16
    rng = np.random.default_rng(5)
    q = rng.standard_normal((4, seq_len, d)).astype(np.float32) * 0.2
    k = rng.standard_normal((2, seq_len, d)).astype(np.float32) * 0.2
    v = rng.standard_normal((2, seq_len, d)).astype(np.float32)
    q[:, :, 0] += 3.0
    k[:, 40:60, 0] += 3.0
    k[:, 100:110, 0] += 3.0
    expected, starts, _ = reference.dhsa_attention(q, k, v, SMALL)
    assert starts.sum() >= 3
    np.testing.assert_allclose(run_core(core_session, q, k, v, 0), expected, atol=ATOL)


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
