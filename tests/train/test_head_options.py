"""Token-conditioned heads and heads with an output vocab: module, training, export, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import edgert
from edgert.errors import ConfigError
from edgert.model.medusa_heads import MedusaConfig, MedusaHeads, load_heads
from edgert.train.distill import IGNORE, DistillData
from edgert.train.heads_loop import (
    TrainOptions,
    frequent_tokens,
    head_losses,
    to_projected,
    train_heads,
)
from tests.tiny_model import save_random_heads

VOCAB_IDS = torch.tensor([1, 3, 7, 10])


def conditioned(output_vocab: int = 4) -> MedusaHeads:
    cfg = MedusaConfig(num_heads=2, num_layers=1, hidden_size=8, vocab_size=11,
                       condition="token", output_vocab=output_vocab)
    return MedusaHeads(cfg, vocab_ids=VOCAB_IDS if output_vocab else None)


def test_fresh_conditioned_heads_are_lm_head_on_their_vocab():
    heads = conditioned()
    h, e, lm_head_t = torch.randn(5, 8), torch.randn(5, 8), torch.randn(8, 11)
    logits = heads(h, heads.select_vocab(lm_head_t), e)
    assert logits.shape == (2, 5, 4)
    torch.testing.assert_close(logits, (h @ lm_head_t[:, VOCAB_IDS]).expand(2, 5, 4))
    assert heads.to_vocab(torch.tensor([0, 3, 2])).tolist() == [1, 10, 7]


def test_conditioned_heads_read_the_root_embedding():
    heads = conditioned(output_vocab=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for block in heads.token_blocks:
            block.linear.weight.normal_()
    h, lm_head_t = torch.randn(3, 8), torch.randn(8, 11)
    a, b = heads(h, lm_head_t, torch.randn(3, 8)), heads(h, lm_head_t, torch.randn(3, 8))
    assert not torch.allclose(a, b)
    with pytest.raises(ConfigError, match="root_embedding"):
        heads(h, lm_head_t)


@pytest.mark.parametrize("bad", [dict(condition="image"), dict(output_vocab=11),
                                 dict(output_vocab=-1)])
def test_bad_head_options_are_refused(bad):
    with pytest.raises(ConfigError):
        MedusaConfig(num_heads=2, num_layers=1, hidden_size=8, vocab_size=11, **bad)


def test_frequent_tokens_and_projected_targets():
    targets = torch.tensor([[5, 5, IGNORE], [2, 5, 3], [2, 9, IGNORE]])
    data = DistillData(torch.zeros(3, 4), targets, 1)
    # counts: 5 x3, 2 x2, 3 x1, 9 x1 -> the tie between 3 and 9 goes to the lower id
    ids = frequent_tokens(data, 3, vocab=12)
    assert ids.tolist() == [2, 3, 5]
    projected = to_projected(targets, ids, 12)
    assert projected.tolist() == [[2, 2, IGNORE], [0, 2, 1], [0, IGNORE, IGNORE]]
    assert to_projected(targets, None, 12) is targets


def test_accuracy_counts_out_of_vocab_targets_as_misses():
    # one head, two positions: the first target is scoreable and hit, the second is outside
    # the output vocab (IGNORE after projection) and must count as a miss
    logits = torch.tensor([[[0.0, 5.0], [5.0, 0.0]]])
    projected = torch.tensor([[1], [IGNORE]])
    valid = torch.tensor([[True], [True]])
    _, top1 = head_losses(logits, projected, valid)
    assert top1 == [0.5]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from edgert.model.sources import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def distill_data(loaded):
    from edgert.train.distill import (
        DistillOptions,
        PromptEncoder,
        build_hf_model,
        generate_responses,
        hidden_and_targets,
    )

    model = build_hf_model(loaded)
    prompts = ["Explain loops.", "What is a class?", "Write a poem about rain.", "Sum 2 and 3."]
    pairs = generate_responses(model, PromptEncoder(loaded), prompts,
                               DistillOptions(max_new_tokens=32, batch_size=4, sampled_share=0))
    return hidden_and_targets(model, pairs, num_heads=3)


def test_roots_are_the_backbones_next_token(distill_data):
    # on greedy responses, the root at t (a_t) is what head 0 at t-1 targets (a_t again)
    same_seq = distill_data.targets[:-1, 0] == distill_data.roots[1:]
    assert float(same_seq.float().mean()) > 0.9  # sequence boundaries are the exceptions
    assert distill_data.roots.shape == (len(distill_data.hidden),)


def test_conditioned_training_lowers_the_loss(loaded, distill_data):
    lm_head_t, embedding = loaded.lm_head_t(), loaded.embedding()
    options = TrainOptions(num_heads=3, steps=40, batch_size=64, lr=1e-2, condition="token",
                           output_vocab=64)
    heads = train_heads(distill_data, lm_head_t, options, embedding=embedding)
    assert heads.vocab_ids.tolist() == frequent_tokens(distill_data, 64,
                                                       lm_head_t.shape[1]).tolist()
    fresh = MedusaHeads(heads.config, lm_head_t, heads.vocab_ids)
    targets = to_projected(distill_data.targets, heads.vocab_ids, lm_head_t.shape[1])
    roots = embedding[distill_data.roots]

    def loss(h):
        with torch.no_grad():
            logits = h(distill_data.hidden, h.select_vocab(lm_head_t), roots)
            return float(head_losses(logits, targets)[0].sum())

    assert loss(heads) < 0.8 * loss(fresh)
    with pytest.raises(ConfigError, match="embedding"):
        train_heads(distill_data, lm_head_t, options)


@pytest.fixture(scope="module")
def conditioned_heads_dir(tiny_dir, tmp_path_factory) -> Path:
    """Random (bad) token-conditioned heads over a 40-token output vocab."""
    cfg = json.loads((tiny_dir / "config.json").read_text())
    vocab_ids = torch.randperm(cfg["vocab_size"], generator=torch.Generator().manual_seed(0))
    return save_random_heads(tiny_dir, tmp_path_factory.mktemp("conditioned_heads"), seed=2,
                             std=0.5, vocab_ids=torch.sort(vocab_ids[:40]).values,
                             condition="token", output_vocab=40)


@pytest.fixture(scope="module")
def conditioned_artifact(tiny_dir, conditioned_heads_dir, tmp_path_factory) -> Path:
    from edgert.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("conditioned") / "art"
    export_model(str(tiny_dir), out, ExportOptions(max_context=768, heads=conditioned_heads_dir,
                                                   tree="cpu", medusa_topk=4),
                 log=lambda m: None)
    return out


def test_exported_heads_graph_matches_the_module(conditioned_artifact, conditioned_heads_dir,
                                                 loaded):
    import onnx

    heads = load_heads(conditioned_heads_dir, loaded.config)
    session = ort.InferenceSession(str(conditioned_artifact / "medusa.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["hidden", "root"]
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, loaded.config.hidden_size)).astype(np.float32)
    roots = np.array([5, 17, 2], dtype=np.int64)
    ids, logits = session.run(None, {"hidden": hidden, "root": roots})
    lm_head_t = loaded.lm_head_t()
    with torch.no_grad():
        expected = heads(torch.from_numpy(hidden), heads.select_vocab(lm_head_t),
                         loaded.embedding()[torch.from_numpy(roots)])
    values, index = torch.topk(expected, 4, dim=-1)
    np.testing.assert_allclose(logits, values.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ids, heads.to_vocab(index).numpy())
    assert set(np.unique(ids)) <= set(heads.vocab_ids.tolist())
    # the embedding is read from the shared weights file, not stored a second time
    graph = onnx.load(str(conditioned_artifact / "medusa.onnx"), load_external_data=False)
    shared = {i.name for i in graph.graph.initializer
              if i.data_location == onnx.TensorProto.EXTERNAL}
    assert "lm_head_t" in shared
    manifest = json.loads((conditioned_artifact / "edgert.json").read_text())
    assert manifest["medusa"]["condition"] == "token"
    assert manifest["medusa"]["output_vocab"] == 40


def test_conditioned_heads_decode_losslessly(conditioned_artifact):
    engine = edgert.load(conditioned_artifact)
    for prompt in ["Explain what a loop is.", "Write a story about a robot."]:
        plain = engine.generate(prompt, max_new_tokens=200, medusa=False)
        fast = engine.generate(prompt, max_new_tokens=200, medusa=True)
        assert fast.output_ids == plain.output_ids, prompt


def test_tvm_build_of_conditioned_heads_matches_ort(conditioned_artifact, tmp_path):
    """llvm: the heads graph (root embedding, output vocab) and Medusa decoding agree with
    ONNX Runtime; webgpu: the narrowed build has no 64-bit integers left."""
    import shutil

    pytest.importorskip("tvm")
    from edgert.passes.build import compile_artifact

    art = tmp_path / "art"
    shutil.copytree(conditioned_artifact, art)
    compile_artifact(art, "llvm", log=lambda m: None)
    ort_engine, tvm_engine = edgert.load(art), edgert.load(art, backend="tvm")
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, ort_engine.manifest.config.hidden_size)).astype(np.float32)
    roots = np.array([7, 30], dtype=np.int64)
    want_ids, want_logits = ort_engine.backend.medusa_topk(hidden, roots)
    got_ids, got_logits = tvm_engine.backend.medusa_topk(hidden, roots)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    prompt = "Write a story about a robot."
    assert (tvm_engine.generate(prompt, max_new_tokens=40, medusa=True).output_ids
            == ort_engine.generate(prompt, max_new_tokens=40, medusa=True).output_ids)
    record = compile_artifact(art, "webgpu", log=lambda m: None)
    assert "medusa.wgsl" in record["files"]
    assert "i64" not in (art / "tvm" / "webgpu" / "medusa.wgsl").read_text()


def test_heads_session_does_not_spin_wait(conditioned_artifact):
    """The heads run between two verification forwards: their idle workers must not spin on
    the cores the next forward needs (docs/medusa.md)."""
    backend = edgert.load(conditioned_artifact).backend
    heads = backend.heads_session.get_session_options()
    assert heads.get_session_config_entry("session.intra_op.allow_spinning") == "0"
