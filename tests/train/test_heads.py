"""Medusa heads: module, training, self-distillation data, export into the artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgert.errors import ModelSourceError
from edgert.model.medusa_heads import MedusaConfig, MedusaHeads, load_heads, save_heads
from edgert.train.distill import (
    DistillOptions,
    PromptEncoder,
    build_hf_model,
    generate_responses,
    hidden_and_targets,
)
from edgert.train.heads_loop import TrainOptions, train_heads

TINY_DISTILL = DistillOptions(max_new_tokens=20, batch_size=4, seed=0)
PROMPTS = ["Explain loops.", "What is a class?", "Write a poem about rain.", "Sum 2 and 3.",
           "Describe a cat.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from edgert.model.sources import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def distill_data(loaded):
    model = build_hf_model(loaded)
    pairs = generate_responses(model, PromptEncoder(loaded), PROMPTS, TINY_DISTILL)
    return hidden_and_targets(model, pairs, num_heads=3)


@pytest.fixture(scope="module")
def trained_heads_dir(loaded, distill_data, tmp_path_factory) -> Path:
    heads = train_heads(distill_data, loaded.lm_head_t(),
                        TrainOptions(num_heads=3, steps=20, batch_size=32, lr=1e-2))
    out = tmp_path_factory.mktemp("heads")
    save_heads(heads, out)
    return out


def test_blocks_are_separate_and_zero_initialised():
    heads = MedusaHeads(MedusaConfig(num_heads=2, num_layers=3, hidden_size=8, vocab_size=11))
    blocks = [b for head in heads.blocks for b in head]
    assert len({id(b.linear.weight) for b in blocks}) == 6
    assert all(float(b.linear.weight.detach().abs().sum()) == 0 for b in blocks)
    h = torch.randn(5, 8)
    lm_head_t = torch.randn(8, 11)
    # zero-initialised residual blocks: every head starts as the backbone's lm_head
    torch.testing.assert_close(heads(h, lm_head_t), (h @ lm_head_t).expand(2, 5, 11))


def test_distillation_is_deterministic_under_seed(loaded):
    model = build_hf_model(loaded)
    encoder = PromptEncoder(loaded)
    first = generate_responses(model, encoder, PROMPTS, TINY_DISTILL)
    second = generate_responses(model, encoder, PROMPTS, TINY_DISTILL)
    other = generate_responses(model, encoder, PROMPTS,
                               DistillOptions(max_new_tokens=20, batch_size=4, seed=1))
    assert first == second
    sampled = len(PROMPTS) // 2
    assert first[-sampled:] != other[-sampled:]  # the sampled half depends on the seed
    assert first[:-sampled] == other[:-sampled]  # the greedy half does not


def test_greedy_responses_are_the_backbones_own_argmax(loaded, tiny_reference):
    model = build_hf_model(loaded)
    pairs = generate_responses(model, PromptEncoder(loaded), PROMPTS[:2],
                               DistillOptions(max_new_tokens=12, batch_size=2,
                                              sampled_share=0.0))
    for prompt_ids, response in pairs:
        with torch.no_grad():
            out = tiny_reference.generate(torch.tensor([prompt_ids]), max_new_tokens=12,
                                          do_sample=False, eos_token_id=2, pad_token_id=2)
        assert response == out[0, len(prompt_ids):].tolist()


def test_targets_are_shifted_argmax(loaded, tiny_reference):
    model = build_hf_model(loaded)
    pairs = [([5, 6, 7], [8, 9, 10, 11, 12])]
    data = hidden_and_targets(model, pairs, num_heads=2)
    seq = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        argmax = tiny_reference(seq).logits[0].argmax(-1)
    # positions 2..6 (from the last prompt token; 7 has no next token to target);
    # head i at t targets argmax[t + i + 1]
    assert data.targets.shape == (5, 2)
    assert data.targets[:, 0].tolist() == argmax[3:].tolist()
    assert data.targets[:, 1].tolist() == argmax[4:].tolist() + [-100]
    torch.testing.assert_close(data.hidden[0], tiny_reference.model(seq).last_hidden_state[0, 2])


def test_a_few_steps_lower_the_loss(loaded, distill_data):
    from edgert.train.heads_loop import head_losses

    lm_head_t = loaded.lm_head_t()
    options = TrainOptions(num_heads=3, steps=30, batch_size=64, lr=1e-2, seed=0)

    def full_loss(heads):
        with torch.no_grad():
            losses, _ = head_losses(heads(distill_data.hidden, lm_head_t), distill_data.targets)
        return float(losses.sum())

    untrained = MedusaHeads(MedusaConfig(3, 1, distill_data.hidden.shape[1], lm_head_t.shape[1]))
    trained = train_heads(distill_data, lm_head_t, options)
    assert full_loss(trained) < 0.9 * full_loss(untrained)


def test_training_is_deterministic_and_resumes(loaded, distill_data, tmp_path):
    lm_head_t = loaded.lm_head_t()
    options = TrainOptions(num_heads=3, steps=12, batch_size=32, lr=1e-2, seed=3,
                           checkpoint_every=5)
    straight = train_heads(distill_data, lm_head_t, options)
    again = train_heads(distill_data, lm_head_t, options)
    # killed during step 7 (last checkpoint: step 5), then resumed to 12
    ckpt = tmp_path / "ckpt.pt"

    def interrupt(report):
        if report.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_heads(distill_data, lm_head_t, options, ckpt, interrupt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 5
    resumed = train_heads(distill_data, lm_head_t, options, ckpt)
    for a, b, c in zip(straight.parameters(), again.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_save_load_round_trip(trained_heads_dir, loaded):
    heads = load_heads(trained_heads_dir, loaded.config)
    assert heads.config.num_heads == 3


def test_mismatched_heads_are_refused(trained_heads_dir, tmp_path, loaded):
    bad = tmp_path / "bad"
    shutil.copytree(trained_heads_dir, bad)
    cfg = json.loads((bad / "heads.json").read_text())
    cfg["vocab_size"] += 1
    (bad / "heads.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="do not fit this model"):
        load_heads(bad, loaded.config)
    with pytest.raises(ModelSourceError, match="not a Medusa heads directory"):
        load_heads(tmp_path, loaded.config)


def test_export_refuses_mismatched_heads(tiny_dir, trained_heads_dir, tmp_path):
    from edgert.export.exporter import ExportOptions, export_model

    bad = tmp_path / "bad"
    shutil.copytree(trained_heads_dir, bad)
    cfg = json.loads((bad / "heads.json").read_text())
    cfg["hidden_size"] = 32
    (bad / "heads.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="hidden_size=32"):
        export_model(str(tiny_dir), tmp_path / "out", ExportOptions(heads=bad, max_context=64),
                     log=lambda m: None)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def heads_artifact(tiny_dir, trained_heads_dir, tmp_path_factory) -> Path:
    from edgert.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("heads_art") / "artifact"
    export_model(str(tiny_dir), out, ExportOptions(heads=trained_heads_dir, max_context=512),
                 log=lambda m: None)
    return out


def test_exported_heads_match_torch(heads_artifact, trained_heads_dir, loaded):
    heads = load_heads(trained_heads_dir, loaded.config)
    session = ort.InferenceSession(str(heads_artifact / "medusa.onnx"))
    hidden = np.random.default_rng(0).standard_normal((7, loaded.config.hidden_size))
    hidden = hidden.astype(np.float32)
    ids, logits = session.run(None, {"hidden": hidden})
    with torch.no_grad():
        ref = heads(torch.from_numpy(hidden), loaded.lm_head_t())  # [K,n,V]
    np.testing.assert_allclose(np.take_along_axis(ref.numpy(), ids, axis=-1), logits, atol=1e-4)
    ref_values, _ = torch.topk(ref, ids.shape[-1], dim=-1)
    np.testing.assert_allclose(logits, ref_values.numpy(), atol=1e-4)


def test_manifest_records_heads(heads_artifact):
    manifest = json.loads((heads_artifact / "edgert.json").read_text())
    assert manifest["medusa"]["num_heads"] == 3
    assert manifest["medusa"]["training"]["method"] if manifest["medusa"]["training"] else True
    assert "medusa.onnx" in manifest["files"]


def test_eval_heads_reports_per_head_accuracy(heads_artifact):
    import edgert
    from edgert.train.eval_heads import evaluate_heads

    engine = edgert.load(heads_artifact)
    acc = evaluate_heads(engine, ["Tell me about lists", "What is a dict?"], max_new_tokens=16)
    assert len(acc.top1) == 3 and all(0 <= a <= b <= 1 for a, b in zip(acc.top1, acc.top5))
    assert acc.positions[0] > acc.positions[2]
