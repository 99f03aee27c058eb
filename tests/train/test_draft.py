"""The EAGLE-style draft layer: data, packing, training, files."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from edgert.errors import ConfigError, ModelSourceError
from edgert.export.decoder import MASK_VALUE
from edgert.export.draft_layer import DraftLayer, load_draft, save_draft
from edgert.model.draft_config import DraftConfig
from edgert.train.distill import (
    IGNORE,
    DistillOptions,
    PromptEncoder,
    build_hf_model,
    generate_responses,
)
from edgert.train.draft_data import sequence_features
from edgert.train.draft_loop import (
    DraftTrainOptions,
    draft_forward,
    embed_tokens,
    pack,
    token_loss,
    train_draft,
)

PROMPTS = ["Explain loops.", "What is a class?", "Write a poem about rain.", "Sum 2 and 3.",
           "Describe a cat.", "Why is the sky blue?", "Name three colours.", "Count to five."]
QUICK = DraftTrainOptions(output_vocab=0, steps=40, sequences_per_step=4, max_tokens=256,
                          lr=3e-3, warmup=0.1, checkpoint_every=10)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from edgert.model.sources import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def model(loaded):
    return build_hf_model(loaded)


@pytest.fixture(scope="module")
def pairs(loaded, model):
    return generate_responses(model, PromptEncoder(loaded), PROMPTS,
                              DistillOptions(max_new_tokens=24, batch_size=4, seed=0))


@pytest.fixture(scope="module")
def data(model, pairs):
    return sequence_features(model, pairs, batch_size=3)


@pytest.fixture(scope="module")
def multilayer_data(model, pairs):
    return sequence_features(model, pairs, batch_size=3, feature_layers=(1,))


def test_features_are_the_backbones(loaded, data, tiny_reference):
    """Every position's feature is the final-norm hidden state, its argmax the backbone's."""
    span = data.span(2)
    ids = data.tokens[span][None]
    with torch.no_grad():
        out = tiny_reference(ids, output_hidden_states=True)
    torch.testing.assert_close(data.hidden[span].float(), out.hidden_states[-1][0],
                               atol=2e-3, rtol=2e-3)  # stored fp16
    assert torch.equal(data.argmax[span], out.logits[0].argmax(-1))
    assert data.sequences == len(PROMPTS)
    assert int(data.prompt_lengths[2]) < span.stop - span.start


def test_multilayer_features_append_the_residual_stream(data, multilayer_data, tiny_reference):
    """With feature_layers (1,): h_t, then transformers' hidden_states[1] (the residual
    stream after layer 1); tokens and argmax as without."""
    h = data.hidden.shape[1]
    assert multilayer_data.hidden.shape == (len(data.tokens), 2 * h)
    torch.testing.assert_close(multilayer_data.hidden[:, :h], data.hidden)
    assert torch.equal(multilayer_data.argmax, data.argmax)
    span = data.span(1)
    with torch.no_grad():
        states = tiny_reference(data.tokens[span][None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(multilayer_data.hidden[span, h:].float(), states[1][0],
                               atol=2e-3, rtol=2e-3)  # stored fp16


def test_multilayer_training_learns_and_needs_matching_data(loaded, data, multilayer_data):
    options = dataclasses.replace(QUICK, feature_layers=(1,))
    losses, top1 = [], []
    draft = train_draft(multilayer_data, loaded.config, loaded.lm_head_t(), options,
                        report=lambda r: (losses.append(r.loss), top1.append(r.top1)))
    assert draft.config.feature_layers == (1,) and draft.aux_fc.weight.abs().sum() > 0
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert sum(top1[-5:]) / 5 > sum(top1[:5]) / 5
    with pytest.raises(ConfigError, match="rebuild the data with the same layers"):
        train_draft(data, loaded.config, loaded.lm_head_t(), options)
    with pytest.raises(ConfigError, match="below the backbone's 2 layers"):
        train_draft(multilayer_data, loaded.config, loaded.lm_head_t(),
                    dataclasses.replace(QUICK, feature_layers=(2,)))


def test_pack_keeps_sequences_apart(data):
    rows = pack(data, [0, 3], max_tokens=10_000)
    lengths = [data.span(s).stop - data.span(s).start - 1 for s in (0, 3)]
    q = sum(lengths)
    assert rows.tokens.shape == (1, q) and rows.bias.shape == (1, 1, q, q)
    # row t reads h_t and x_{t+1} at position t+1, and targets h_{t+1}, a_{t+1}
    first = data.span(3).start
    r = lengths[0] + 4
    assert int(rows.positions[0, r]) == 5
    assert int(rows.tokens[0, r]) == int(data.tokens[first + 5])
    assert int(rows.target_tokens[r]) == int(data.argmax[first + 5])
    torch.testing.assert_close(rows.target_features[r], data.hidden[first + 5].float())
    bias = rows.bias[0, 0]
    assert float(bias[r, lengths[0]]) == 0.0 and float(bias[r, r]) == 0.0
    assert float(bias[r, lengths[0] - 1]) == MASK_VALUE  # the other sequence
    assert float(bias[r, r + 1]) == MASK_VALUE  # the future
    assert pack(data, [0, 3], max_tokens=7).tokens.shape == (1, 7)


def test_packed_rows_equal_each_sequence_alone(loaded, data):
    """The block-diagonal bias makes a packed forward equal separate forwards."""
    draft = DraftLayer(DraftConfig.for_backbone(loaded.config)).eval()
    lm_head_t = loaded.lm_head_t()
    both = pack(data, [1, 4], max_tokens=10_000)
    alone = pack(data, [4], max_tokens=10_000)
    with torch.no_grad():
        packed = draft_forward(draft, both.features, embed_tokens(both.tokens, lm_head_t,
                                                                  loaded.config),
                               both.positions, both.bias)
        single = draft_forward(draft, alone.features, embed_tokens(alone.tokens, lm_head_t,
                                                                   loaded.config),
                               alone.positions, alone.bias)
    torch.testing.assert_close(packed[0, -alone.tokens.shape[1]:], single[0], atol=1e-5,
                               rtol=1e-5)


def test_training_lowers_the_loss_and_learns_the_next_token(loaded, data):
    losses, top1 = [], []
    train_draft(data, loaded.config, loaded.lm_head_t(), QUICK,
                report=lambda r: (losses.append(r.loss), top1.append(r.top1)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert sum(top1[-5:]) / 5 > sum(top1[:5]) / 5


def test_soft_token_loss_is_the_cross_entropy_against_the_backbones_softmax():
    """-sum p log q per row, averaged (NumPy reference, 1e-5); a near one-hot target gives the
    argmax cross-entropy; the hard loss ignores targets outside the output vocab."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    logits, target_logits = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 3
    p = np.exp(target_logits.numpy() - target_logits.numpy().max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    z = logits.numpy().astype(np.float64)
    log_q = z - z.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    expected = float(-(p * log_q).sum(-1).mean())
    assert abs(float(token_loss(logits, torch.zeros(5, dtype=torch.int64), target_logits))
               - expected) < 1e-5
    argmax = target_logits.argmax(-1)
    peaked = torch.nn.functional.one_hot(argmax, 7).float() * 100.0
    torch.testing.assert_close(token_loss(logits, argmax, peaked),
                               torch.nn.functional.cross_entropy(logits, argmax))
    partly = torch.tensor([1, IGNORE, 2, IGNORE, 0])
    torch.testing.assert_close(token_loss(logits, partly, None),
                               torch.nn.functional.cross_entropy(logits[[0, 2, 4]],
                                                                 partly[[0, 2, 4]]))


def test_training_on_the_backbones_distribution_learns_the_next_token(loaded, data):
    losses, top1 = [], []
    options = DraftTrainOptions(**{**QUICK.__dict__, "token_target": "distribution",
                                   "token_weight": 1.0})
    train_draft(data, loaded.config, loaded.lm_head_t(), options,
                report=lambda r: (losses.append(r.loss), top1.append(r.top1)))
    # the soft cross-entropy cannot fall below the targets' entropy (the random tiny
    # backbone's distributions are wide): a smaller drop than the argmax loss's
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert sum(top1[-5:]) / 5 > sum(top1[:5]) / 5
    with pytest.raises(ConfigError, match="token_target"):
        train_draft(data, loaded.config, loaded.lm_head_t(),
                    DraftTrainOptions(**{**QUICK.__dict__, "token_target": "soft"}))


class Interrupted(Exception):
    pass


def test_training_is_deterministic_and_resumes(loaded, data, tmp_path):
    options = DraftTrainOptions(output_vocab=64, steps=12, sequences_per_step=3,
                                max_tokens=128, checkpoint_every=6)
    whole = train_draft(data, loaded.config, loaded.lm_head_t(), options)

    def stop_after_six(report):
        if report.step == 7:
            raise Interrupted  # killed after the step-6 checkpoint

    with pytest.raises(Interrupted):
        train_draft(data, loaded.config, loaded.lm_head_t(), options,
                    checkpoint=tmp_path / "c.pt", report=stop_after_six)
    assert torch.load(tmp_path / "c.pt", weights_only=False)["step"] == 6
    resumed = train_draft(data, loaded.config, loaded.lm_head_t(), options,
                          checkpoint=tmp_path / "c.pt")
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert whole.config.output_vocab == 64 and whole.vocab_ids.shape == (64,)
    saved = torch.load(tmp_path / "c.pt", weights_only=False)  # made before token_target
    del saved["options"]["token_target"]
    torch.save(saved, tmp_path / "old.pt")
    train_draft(data, loaded.config, loaded.lm_head_t(), options, checkpoint=tmp_path / "old.pt")
    with pytest.raises(ConfigError, match="token_target='argmax'"):
        train_draft(data, loaded.config, loaded.lm_head_t(),
                    DraftTrainOptions(**{**options.__dict__, "token_target": "distribution"}),
                    checkpoint=tmp_path / "old.pt")
    with pytest.raises(ConfigError, match="lr"):
        train_draft(data, loaded.config, loaded.lm_head_t(),
                    DraftTrainOptions(**{**options.__dict__, "lr": 0.5}),
                    checkpoint=tmp_path / "c.pt")


def test_save_load_round_trip_and_refusals(loaded, tmp_path):
    draft = DraftLayer(DraftConfig.for_backbone(loaded.config, output_vocab=32))
    save_draft(draft, tmp_path / "d")
    back = load_draft(tmp_path / "d", loaded.config)
    for (name, a), (_, b) in zip(draft.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "d", bad)
    cfg = json.loads((bad / "draft.json").read_text())
    cfg["layer"]["hidden_size"] += 8
    (bad / "draft.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="hidden_size"):
        load_draft(bad, loaded.config)
    with pytest.raises(ModelSourceError, match="not a draft layer directory"):
        load_draft(tmp_path, loaded.config)
    with pytest.raises(ConfigError, match="one decoder layer"):
        DraftConfig({**cfg["layer"], "num_hidden_layers": 2})
    multilayer = DraftLayer(DraftConfig.for_backbone(loaded.config, feature_layers=(1,)))
    save_draft(multilayer, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "draft.json").read_text())["feature_layers"] == [1]
    assert load_draft(tmp_path / "m", loaded.config).config.feature_layers == (1,)
    assert "feature_layers" not in json.loads((tmp_path / "d" / "draft.json").read_text())
    wide = json.loads((tmp_path / "m" / "draft.json").read_text())
    wide["feature_layers"] = [5]
    (tmp_path / "m" / "draft.json").write_text(json.dumps(wide))
    with pytest.raises(ModelSourceError, match="after layers \\[5\\], but this model has 2"):
        load_draft(tmp_path / "m", loaded.config)


def test_batched_responses_equal_transformers_greedy(loaded, tiny_artifact):
    """The artifact's parallel slots answer as transformers' generate does (greedy half; the
    sampled half is seeded per prompt)."""
    import edgert
    from edgert.train.batch_responses import generate_responses_batched

    options = DistillOptions(max_new_tokens=16, batch_size=4, seed=0, sampled_share=0.25)
    encoder = PromptEncoder(loaded)
    batched = generate_responses_batched(edgert.load(tiny_artifact), encoder, PROMPTS,
                                         options, slots=3)
    reference = generate_responses(build_hf_model(loaded), encoder, PROMPTS, options)
    greedy = len(PROMPTS) - 2
    assert batched[:greedy] == reference[:greedy]
    again = generate_responses_batched(edgert.load(tiny_artifact), encoder, PROMPTS, options,
                                       slots=2)
    assert again == batched  # the sampled ones too: seeded per prompt, whatever runs beside


def test_feature_layers_key_the_features_not_the_answers(loaded):
    """Adding residual layers rebuilds only the features: the cached answers keep their key."""
    from edgert.train.train_draft import TrainDraftOptions, data_key, responses_key

    plain = TrainDraftOptions()
    layered = TrainDraftOptions(train=DraftTrainOptions(feature_layers=(1,)))
    assert responses_key(loaded, plain) == responses_key(loaded, layered)
    assert data_key(loaded, plain) == responses_key(loaded, plain)
    assert data_key(loaded, layered) == responses_key(loaded, plain) + "-layers1"


def test_train_draft_refuses_missing_layers_before_building_data(tiny_dir, tmp_path):
    from edgert.train.train_draft import TrainDraftOptions, train_draft_for_model

    options = TrainDraftOptions(train=DraftTrainOptions(feature_layers=(5,)))
    with pytest.raises(ConfigError, match="below the backbone's 2 layers"):
        train_draft_for_model(str(tiny_dir), tmp_path / "d", options, log=lambda m: None)
    assert not (tmp_path / "d").exists()  # nothing answered, nothing written
