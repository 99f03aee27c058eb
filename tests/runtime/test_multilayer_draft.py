"""A draft with multi-layer features (EAGLE-3 style: ``feature_layers``): the backbone's graphs
return the residual stream next to the final hidden state, the draft graph reads both and
equals its torch module, rows without the residual states read ``fc``'s part alone, and
speculative decoding with it stays lossless (ONNX Runtime fp32 and 8-bit, TVM)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import edgert
from edgert.export.draft_layer import load_draft
from edgert.runtime.steps import causal_mask
from edgert.train.draft_loop import draft_forward, embed_tokens
from tests.runtime.drafts import PROMPTS, assert_lossless, export


@pytest.fixture(scope="module")
def artifact(tiny_dir, multilayer_draft_dir, tmp_path_factory):
    return export(tiny_dir, tmp_path_factory.mktemp("ml") / "art", multilayer_draft_dir,
                  draft_weights="fp32")


def _draft_rows(draft, loaded, features, tokens):
    n = tokens.shape[1]
    with torch.no_grad():
        return draft_forward(draft, torch.from_numpy(features),
                             embed_tokens(torch.from_numpy(tokens), loaded.lm_head_t(),
                                          loaded.config),
                             torch.arange(1, n + 1)[None], torch.from_numpy(causal_mask(n)))[0]


def test_the_manifest_names_the_wider_features(artifact, loaded):
    manifest = json.loads((artifact / "edgert.json").read_text())
    h = loaded.config.hidden_size
    for graph in ("ort_gqa", "portable"):
        features = manifest["graphs"][graph]["outputs"][-1]
        assert features["name"] == "features" and features["shape"][-1] == 2 * h
        assert "after layers [1]" in features["meaning"]
    draft_in = {t["name"]: t for t in manifest["graphs"]["draft"]["inputs"]}
    assert draft_in["features"]["shape"][-1] == 2 * h
    assert manifest["draft"]["feature_layers"] == [1]


def test_features_are_the_final_state_then_the_residual_stream(artifact, tiny_reference,
                                                               loaded):
    engine = edgert.load(artifact)
    ids = engine.encode("What is a function?")
    out = engine.prefill_ids(ids)
    with torch.no_grad():
        states = tiny_reference(torch.tensor([ids]), output_hidden_states=True).hidden_states
    h = loaded.config.hidden_size
    assert out.features.shape == (len(ids), 2 * h)
    np.testing.assert_allclose(out.features[:, :h], states[-1][0].numpy(), atol=1e-4)
    np.testing.assert_allclose(out.features[:, h:], states[1][0].numpy(), atol=1e-4)


def test_draft_graph_equals_its_torch_module(artifact, multilayer_draft_dir, loaded):
    """Rows with the residual states and rows without (zeros: drafted on the draft's own
    output), written after a cached prefix, against one causal forward (atol 1e-4);
    draft_hidden is f with zeros where the residual states go."""
    cfg = loaded.config
    h, n, first = cfg.hidden_size, 7, 4
    draft = load_draft(multilayer_draft_dir, cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, n))
    features = rng.standard_normal((1, n, 2 * h)).astype(np.float32) * 3
    features[0, 5:, h:] = 0  # the last two rows drafted on their own
    ref = _draft_rows(draft, loaded, features, tokens).numpy()
    cache = np.zeros((1, cfg.num_key_value_heads, 16, cfg.head_dim), np.float32)
    session = ort.InferenceSession(str(artifact / "draft.onnx"))
    key, value = cache, cache.copy()
    for lo, hi in ((0, first), (first, n)):
        q = hi - lo
        _, _, hidden, key, value = session.run(None, {
            "input_ids": tokens[:, lo:hi], "features": features[:, lo:hi],
            "position_ids": np.arange(lo + 1, hi + 1)[None], "tree_mask": causal_mask(q),
            "logits_index": np.arange(q), "seqlens_k": np.array([hi - 1], np.int32),
            "total_sequence_length": np.array(hi, np.int32), "draft_past_key": key,
            "draft_past_value": value})
        assert hidden.shape == (1, q, 2 * h)
        np.testing.assert_allclose(hidden[0, :, :h], ref[lo:hi], atol=1e-4)
        assert not hidden[0, :, h:].any()


def test_rows_without_residual_states_read_fc_alone(multilayer_draft_dir, loaded):
    """Zeros in the residual part contribute nothing: the same rows through a copy of the
    draft whose aux_fc is zero give the same features."""
    cfg = loaded.config
    draft = load_draft(multilayer_draft_dir, cfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, 5))
    features = rng.standard_normal((1, 5, 2 * cfg.hidden_size)).astype(np.float32)
    features[..., cfg.hidden_size:] = 0
    ablated = load_draft(multilayer_draft_dir, cfg)
    with torch.no_grad():
        ablated.aux_fc.weight.zero_()
    torch.testing.assert_close(_draft_rows(draft, loaded, features, tokens),
                               _draft_rows(ablated, loaded, features, tokens))
    features[..., cfg.hidden_size:] = 1.0  # and real residual states do change them
    assert not torch.allclose(_draft_rows(draft, loaded, features, tokens),
                              _draft_rows(ablated, loaded, features, tokens))


@pytest.mark.parametrize("mode", ["draft", "draft+lookup"])
def test_a_multilayer_draft_is_lossless(artifact, mode):
    assert_lossless(edgert.load(artifact), mode)


def test_the_8_bit_multilayer_draft_is_lossless(tiny_dir, multilayer_draft_dir, tmp_path):
    import onnx

    art = export(tiny_dir, tmp_path / "q8", multilayer_draft_dir)
    graph = onnx.load(str(art / "draft.onnx"), load_external_data=False).graph
    assert len([n for n in graph.node if n.op_type == "MatMulNBits"]) == 7  # + aux_fc
    assert_lossless(edgert.load(art), "draft", PROMPTS[:2], max_new_tokens=32)


def test_tvm_drafts_with_a_multilayer_draft(tiny_dir, multilayer_draft_dir, tmp_path):
    pytest.importorskip("tvm")
    from edgert.passes.build import compile_artifact

    art = export(tiny_dir, tmp_path / "art", multilayer_draft_dir, draft_weights="fp32")
    compile_artifact(art, "llvm", log=lambda m: None)
    ort_engine, tvm_engine = edgert.load(art), edgert.load(art, backend="tvm")
    ids = ort_engine.encode(PROMPTS[0])
    np.testing.assert_allclose(tvm_engine.prefill_ids(ids).features,
                               ort_engine.prefill_ids(ids).features, atol=1e-4)
    for prompt in PROMPTS[:2]:
        plain = ort_engine.generate(prompt, max_new_tokens=32, speculative="off")
        spec = tvm_engine.generate(prompt, max_new_tokens=32, speculative="draft")
        assert spec.output_ids == plain.output_ids, prompt


def test_dhsa_prefill_returns_the_wider_features(tiny_dir, multilayer_draft_dir, tmp_path):
    """The sparse prefill graph returns the residual states too, and drafting after it stays
    lossless."""
    from edgert.dhsa.params import DHSAParams

    params = DHSAParams(block_size=16, budget=64, local=16, sink=4, dense_tail=8,
                        probe_stride=8, min_context=128, prefill_chunk=64, early_layers=0)
    art = export(tiny_dir, tmp_path / "art", multilayer_draft_dir, draft_weights="fp32",
                 dhsa=params)
    engine = edgert.load(art)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    ids = engine.encode(text, chat=False)
    assert len(ids) > params.min_context and engine.backend.has_dhsa
    sparse = engine.prefill_ids(ids, sparse=True).features
    dense = engine.prefill_ids(ids).features
    h = engine.manifest.config.hidden_size
    assert sparse.shape == dense.shape == (len(ids), 2 * h)
    plain = engine.generate(text, max_new_tokens=24, chat=False, dhsa=True, speculative="off")
    drafted = engine.generate(text, max_new_tokens=24, chat=False, dhsa=True,
                              speculative="draft")
    assert drafted.stats["prefill"] == "dhsa" and drafted.output_ids == plain.output_ids
