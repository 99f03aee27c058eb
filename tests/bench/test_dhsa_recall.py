"""bench/dhsa_recall.py's measure: the share of dense attention mass a selection keeps."""

from __future__ import annotations

import numpy as np
import torch

from bench import dhsa_recall
from edgert.dhsa.params import DHSAParams
from edgert.export.decoder import Decoder
from edgert.model.config import DecoderConfig

PARAMS = DHSAParams(block_size=16, budget=48, local=16, sink=4, dense_tail=8, probe_stride=8,
                    min_context=64, early_layers=0, prefill_chunk=64)


def random_qk(seq_len, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((4, seq_len, 16)).astype(np.float16),
            rng.standard_normal((2, seq_len, 16)).astype(np.float16))


def test_budget_covering_the_context_keeps_everything():
    q, k = random_qk(150, 0)
    params = DHSAParams(**{**PARAMS.to_dict(), "budget": 256, "min_context": 256})
    recall = dhsa_recall.layer_recall(q, k, np.ones(150, bool), params, 1)
    np.testing.assert_allclose(recall, 1.0, atol=1e-5)


def test_recall_is_the_selected_share_of_dense_attention():
    """Against a direct computation for one query: softmax over its causal keys, summed over
    the keys its block selected (the reference's selection)."""
    from edgert.dhsa import reference

    q, k = random_qk(150, 1)
    starts = np.zeros(150, bool)
    starts[::10] = True
    recall = dhsa_recall.layer_recall(q, k, starts, PARAMS, 1)
    assert recall.min() < 0.99  # a budget of 48 of up to 142 keys misses some mass
    qf, kf = q.astype(np.float32), k.astype(np.float32)
    call_start, end = reference.prefill_calls(150, PARAMS)[1]  # rows [64, 128)
    sel = reference.select_keys(reference.token_scores(qf[:, :end], kf[:, :end], starts[:end],
                                                       PARAMS, call_start), end, PARAMS,
                                call_start)
    row, head = 100, 3  # block (100 - 64) // 16 = 2 of the second call
    logits = qf[head, row] @ kf[head // 2, :row + 1].T / 4.0
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keys = sel.keys(2)
    want = probs[keys[keys <= row]].sum()
    # the recall rows are ordered call, block, head, query: 64 queries per call of 4 blocks
    got = recall[64 * 4 + 2 * 16 * 4 + head * 16 + (row - 96)]
    assert abs(got - want) < 1e-5


def test_recording_core_attends_as_the_model_does():
    """The bench's dense forward swaps every attention core for one that records q/k: the
    model's logits stay those of its own (portable) core, and the q/k have the right shapes."""
    config = DecoderConfig(vocab_size=32, hidden_size=32, intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    model = Decoder(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    t = 20
    causal = torch.triu(torch.full((1, 1, t, t), -torch.inf), diagonal=1)
    empty = torch.zeros(1, 2, 0, 8)
    args = (torch.arange(t)[None] % 32, torch.arange(t)[None], causal, torch.arange(t),
            *([empty] * 4))
    with torch.no_grad():
        want = model(*args)[0]
    q, k = dhsa_recall.dense_queries_and_keys(model, list(range(t)))
    assert q.shape == (2, 4, t, 8) and k.shape == (2, 2, t, 8)
    with torch.no_grad():
        got = model(*args)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
