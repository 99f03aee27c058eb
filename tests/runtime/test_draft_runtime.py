"""The draft layer in the artifact and the decode loop: its graph against its torch module,
the backbone's features output, lossless speculative decoding whatever it drafts, and a
trained draft's tokens accepted."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import edgert
from edgert.errors import GenerationError
from edgert.export.draft_layer import load_draft
from edgert.export.quantize import WeightOptions
from edgert.runtime.steps import causal_mask
from edgert.speculative.dynamic_tree import DraftTreeParams
from edgert.train.draft_loop import draft_forward, embed_tokens
from tests.runtime.drafts import PROMPTS, TRAIN_PROMPTS, assert_lossless, export


@pytest.fixture(scope="module")
def draft_artifact(tiny_dir, random_draft_dir, tmp_path_factory):
    """The draft kept fp32 (the default stores its own matrices 8-bit)."""
    return export(tiny_dir, tmp_path_factory.mktemp("a") / "art", random_draft_dir,
                  draft_weights="fp32")


@pytest.fixture(scope="module")
def trained_artifact(tiny_dir, trained_draft_dir, tmp_path_factory):
    return export(tiny_dir, tmp_path_factory.mktemp("t") / "art", trained_draft_dir)


def test_the_draft_is_8_bit_by_default(trained_artifact):
    """In an fp32 artifact too: its tokens are verified, so precision is only speed."""
    import onnx

    manifest = json.loads((trained_artifact / "edgert.json").read_text())
    assert manifest["quantization"] is None and manifest["draft"]["weights"].startswith("rtn8")
    graph = onnx.load(str(trained_artifact / "draft.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(next(a.i for a in n.attribute if a.name == "bits") == 8
                         for n in nbits)


def test_manifest_and_files(draft_artifact):
    manifest = json.loads((draft_artifact / "edgert.json").read_text())
    assert manifest["draft"]["weights"] == "fp32"
    assert manifest["draft"]["topk"] == 4 and manifest["draft"]["depth"] == 4  # as exported
    assert manifest["draft"]["kv_cache"]["num_layers"] == 1
    assert "feature_layers" not in manifest["draft"]  # a single-feature draft
    assert manifest["draft"]["kv_cache"]["capacity"] >= manifest["kv_cache"]["capacity"]
    assert (draft_artifact / "draft.onnx").is_file()
    outputs = [t["name"] for t in manifest["graphs"]["ort_gqa"]["outputs"]]
    assert outputs[-1] == "features"
    assert [t["name"] for t in manifest["graphs"]["portable"]["outputs"]][-1] == "features"


def _session_run(artifact, feed, capacity):
    session = ort.InferenceSession(str(artifact / "draft.onnx"))
    return session.run(None, feed)


def _torch_rows(draft_dir, loaded, n: int, seed: int):
    """The draft module in ``draft_dir`` and one causal forward of n random rows (tokens,
    features, positions 1..n): (draft, tokens, features, positions, its features [n,H])."""
    draft = load_draft(draft_dir, loaded.config)
    cfg = loaded.config
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, n))
    features = rng.standard_normal((1, n, draft.config.feature_size)).astype(np.float32)
    positions = np.arange(1, n + 1)[None]
    with torch.no_grad():
        ref = draft_forward(draft, torch.from_numpy(features),
                            embed_tokens(torch.from_numpy(tokens), loaded.lm_head_t(), cfg),
                            torch.from_numpy(positions), torch.from_numpy(causal_mask(n)))[0]
    return draft, tokens, features, positions, ref


def test_draft_graph_equals_its_torch_module(draft_artifact, random_draft_dir, loaded):
    """Rows written after a cached prefix equal the matching rows of one causal forward of
    the whole sequence in the torch module (atol 1e-4): ids, log-probabilities, features."""
    cfg = loaded.config
    n, first = 9, 5
    draft, tokens, features, positions, ref = _torch_rows(random_draft_dir, loaded, n, seed=0)
    with torch.no_grad():
        ref_logprobs = torch.log_softmax(
            draft.logits(ref, draft.select_vocab(loaded.lm_head_t())), dim=-1)
    capacity = 16
    cache = np.zeros((1, cfg.num_key_value_heads, capacity, cfg.head_dim), np.float32)
    session = ort.InferenceSession(str(draft_artifact / "draft.onnx"))
    key, value = cache.copy(), cache.copy()
    for lo, hi in ((0, first), (first, n)):
        q = hi - lo
        ids, logprobs, hidden, key, value = session.run(None, {
            "input_ids": tokens[:, lo:hi], "features": features[:, lo:hi],
            "position_ids": positions[:, lo:hi], "tree_mask": causal_mask(q),
            "logits_index": np.arange(q), "seqlens_k": np.array([hi - 1], np.int32),
            "total_sequence_length": np.array(hi, np.int32), "draft_past_key": key,
            "draft_past_value": value})
        np.testing.assert_allclose(hidden[0], ref[lo:hi].numpy(), atol=1e-4)
        top_values, top_index = torch.topk(ref_logprobs[lo:hi], ids.shape[-1], dim=-1)
        np.testing.assert_allclose(logprobs[0], top_values.numpy(), atol=1e-4)
        assert np.array_equal(ids[0], draft.to_vocab(top_index).numpy())


def test_the_8_bit_draft_fuses_the_matmuls_that_share_an_input(tiny_dir, random_draft_dir,
                                                                 loaded, tmp_path):
    """q/k/v and gate/up run as one MatMulNBits each (fc, qkv, o, gate_up, down, the vocab
    rows: six), and the graph still computes the torch module's features (8-bit weights,
    int8 activations: within 3% of their scale)."""
    import onnx

    artifact = export(tiny_dir, tmp_path / "q8", random_draft_dir)
    graph = onnx.load(str(artifact / "draft.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 6, [n.name for n in nbits]
    widths = sorted(next(a.i for a in n.attribute if a.name == "N") for n in nbits)
    cfg = loaded.config
    kv = cfg.num_key_value_heads * cfg.head_dim
    assert cfg.hidden_size + 2 * kv in widths and 2 * cfg.intermediate_size in widths
    n = 6
    _, tokens, features, positions, ref = _torch_rows(random_draft_dir, loaded, n, seed=1)
    cache = np.zeros((1, cfg.num_key_value_heads, 8, cfg.head_dim), np.float32)
    _, _, hidden, _, _ = ort.InferenceSession(str(artifact / "draft.onnx")).run(None, {
        "input_ids": tokens, "features": features, "position_ids": positions,
        "tree_mask": causal_mask(n), "logits_index": np.arange(n),
        "seqlens_k": np.array([n - 1], np.int32), "total_sequence_length": np.array(n, np.int32),
        "draft_past_key": cache, "draft_past_value": cache.copy()})
    scale = float(np.abs(ref.numpy()).max())
    np.testing.assert_allclose(hidden[0], ref.numpy(), atol=0.03 * scale)


def test_features_output_is_every_rows_hidden_state(draft_artifact, tiny_reference):
    engine = edgert.load(draft_artifact)
    ids = engine.encode("What is a function?")
    out = engine.prefill_ids(ids)
    with torch.no_grad():
        ref = tiny_reference(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    assert out.features.shape == (len(ids), ref.shape[-1])
    np.testing.assert_allclose(out.features, ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.hidden[-1], out.features[-1], atol=1e-6)


@pytest.mark.parametrize("mode", ["draft", "draft+lookup"])
def test_any_draft_is_lossless(draft_artifact, mode):
    assert_lossless(edgert.load(draft_artifact), mode)


def test_int8_artifact_with_a_draft_is_lossless(tiny_dir, random_draft_dir, tmp_path):
    art = export(tiny_dir, tmp_path / "q4", random_draft_dir,
                 weights=WeightOptions(weights="q4"))
    manifest = json.loads((art / "edgert.json").read_text())
    assert "draft_layer" in manifest["quantization"]["groups"]
    engine = edgert.load(art)
    for prompt in PROMPTS[:2]:
        assert (engine.generate(prompt, max_new_tokens=32, speculative="draft").output_ids
                == engine.generate(prompt, max_new_tokens=32, speculative="off").output_ids)


def test_a_trained_draft_gets_tokens_accepted(trained_artifact):
    """Its chains are accepted (a misaligned feature or position would make them useless):
    more than one token per verification step, most of them from the draft."""
    engine = edgert.load(trained_artifact)
    steps = accepted = 0
    for prompt in TRAIN_PROMPTS[:4]:
        plain = engine.generate(prompt, max_new_tokens=32, speculative="off")
        out = engine.generate(prompt, max_new_tokens=32, speculative="draft")
        assert out.output_ids == plain.output_ids
        steps += out.stats["steps"]
        accepted += out.stats["accepted_by"]["draft"]
    assert accepted / steps > 0.5, (accepted, steps)


def test_draft_cache_is_allocated_once_when_drafting_starts(draft_artifact):
    """Plain and Medusa decoding hold no draft cache; the first drafting step allocates it,
    and every later generation reuses that one."""
    engine = edgert.load(draft_artifact)
    engine.generate(PROMPTS[0], max_new_tokens=10, speculative="off")
    assert engine.backend._draft_cache is None
    engine.generate(PROMPTS[0], max_new_tokens=30, speculative="draft")
    before = engine.backend.draft_cache.storage
    engine.generate(PROMPTS[1], max_new_tokens=30, speculative="draft")
    assert engine.backend.draft_cache.storage is before


def test_prefix_reuse_with_the_draft(trained_artifact):
    engine = edgert.load(trained_artifact, prefix_reuse=True)
    reference = edgert.load(trained_artifact)
    first = engine.generate(PROMPTS[0], max_new_tokens=16, speculative="draft")
    turn = [{"role": "user", "content": PROMPTS[0]},
            {"role": "assistant", "content": first.text}, {"role": "user", "content": "More"}]
    again = engine.generate(turn, max_new_tokens=24, speculative="draft")
    assert again.stats["reused_tokens"] > 0
    assert again.output_ids == reference.generate(turn, max_new_tokens=24,
                                                  speculative="draft").output_ids
    steps = again.stats["steps"]
    assert again.stats["accepted_by"]["draft"] / steps > 0.3


def test_no_draft_named(tiny_engine):
    with pytest.raises(GenerationError, match="no draft layer"):
        tiny_engine.generate("Hi", max_new_tokens=4, speculative="draft")


def test_eval_draft_reports_per_step_accuracy(trained_artifact):
    from edgert.train.eval_draft import evaluate_draft

    engine = edgert.load(trained_artifact)
    acc = evaluate_draft(engine, TRAIN_PROMPTS[:3], max_new_tokens=24, depth=4)
    assert acc.prompts == 3 and acc.positions > 30
    assert len(acc.top1) == len(acc.accept) == engine.draft_depth == 4
    assert acc.accept[0] == acc.top1[0] > 0.5  # step 1 has no previous step
    assert all(0.0 <= a <= 1.0 for a in acc.accept)
    # tau is one plus the mean accepted chain: at least one token when step 1 is right
    assert acc.tokens_per_step >= 1 + acc.top1[0]
    # the real decode loop accepts about what eval-draft predicts, with chains and with the
    # dynamic tree (the fp32 default: breadth for depth by the draft's own confidence)
    taus = {}
    for name, params in (("chain", DraftTreeParams(depth=engine.draft_depth, beam=1, topk=1,
                                                   budget=engine.draft_depth)),
                         ("tree", engine.draft_tree)):
        engine.draft_tree = params
        steps = accepted = 0
        for prompt in TRAIN_PROMPTS[:3]:
            out = engine.generate(prompt, max_new_tokens=24, speculative="draft")
            steps += out.stats["steps"]
            accepted += out.stats["accepted_by"]["draft"]
        taus[name] = 1 + accepted / steps
    # (eval-draft visits every position; the loop only those where a step starts)
    assert abs(taus["chain"] / acc.tokens_per_step - 1) < 0.25, (taus, acc.tokens_per_step)
    assert taus["tree"] > 2.0, taus
