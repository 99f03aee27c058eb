"""Draft layers for the runtime tests, built once per session: a random one and one trained
on the tiny backbone's own answers (both backends' draft tests read them)."""

from __future__ import annotations

import pytest
import torch

from edgert.export.draft_layer import DraftLayer, save_draft
from edgert.model.draft_config import DraftConfig
from tests.runtime.drafts import TRAIN_PROMPTS


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    from edgert.model.sources import load_model

    return load_model(str(tiny_dir))


def _random_draft(loaded, out, feature_layers=()):
    torch.manual_seed(3)
    draft = DraftLayer(DraftConfig.for_backbone(loaded.config, output_vocab=96,
                                                feature_layers=feature_layers),
                       vocab_ids=torch.randperm(loaded.config.vocab_size)[:96].sort().values)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_draft(draft, out)
    return out


@pytest.fixture(scope="session")
def random_draft_dir(loaded, tmp_path_factory):
    return _random_draft(loaded, tmp_path_factory.mktemp("draft"))


@pytest.fixture(scope="session")
def multilayer_draft_dir(loaded, tmp_path_factory):
    """A random draft that also reads the residual stream after the tiny model's layer 1."""
    return _random_draft(loaded, tmp_path_factory.mktemp("draft_ml"), feature_layers=(1,))


@pytest.fixture(scope="session")
def trained_draft_dir(loaded, tmp_path_factory):
    """A draft trained on the tiny backbone's own answers (a few seconds)."""
    from edgert.train.distill import (
        DistillOptions,
        PromptEncoder,
        build_hf_model,
        generate_responses,
    )
    from edgert.train.draft_data import sequence_features
    from edgert.train.draft_loop import DraftTrainOptions, train_draft

    model = build_hf_model(loaded)
    pairs = generate_responses(model, PromptEncoder(loaded), TRAIN_PROMPTS,
                               DistillOptions(max_new_tokens=40, batch_size=5, seed=0,
                                              sampled_share=0.0))
    data = sequence_features(model, pairs)
    draft = train_draft(data, loaded.config, loaded.lm_head_t(),
                        DraftTrainOptions(output_vocab=0, steps=80, sequences_per_step=4,
                                          max_tokens=512, lr=3e-3, noise=0.0))
    out = tmp_path_factory.mktemp("trained_draft")
    save_draft(draft, out)
    return out
