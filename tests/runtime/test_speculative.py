"""Medusa decoding: acceptance rules, commit, EOS, capacity, and losslessness end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import edgert
from edgert.artifact.manifest import GraphKey
from edgert.medusa.tree_buffers import build_tree_buffers, chain_tree
from edgert.model.medusa_heads import save_heads
from edgert.runtime.sampling import SamplingParams
from edgert.runtime.speculative import accept_greedy, accept_typical, propose_tree
from tests.tiny_model import save_random_heads

V = 12
TREE = build_tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], topk=2)
# nodes: 0 root, 1 (0), 2 (1), 3 (0,0), 4 (0,1), 5 (1,0), 6 (0,0,0)


def logits_predicting(pred: list[int]) -> np.ndarray:
    """Logits whose argmax at node i is pred[i]."""
    logits = np.zeros((len(pred), V), dtype=np.float32)
    logits[np.arange(len(pred)), pred] = 5.0
    return logits


def test_propose_places_head_candidates():
    head_ids = np.array([[7, 8, 99], [3, 4, 99], [5, 6, 99]])  # k=3 from the graph, tree uses 2
    tokens = propose_tree(TREE, root=1, head_ids=head_ids)
    assert tokens.tolist() == [1, 7, 8, 3, 4, 3, 5]


def test_greedy_all_rejected():
    tokens = np.array([1, 7, 8, 3, 4, 3, 5])
    acc = accept_greedy(TREE, tokens, logits_predicting([9, 9, 9, 9, 9, 9, 9]))
    assert acc.nodes.tolist() == [0] and acc.next_token == 9


def test_greedy_all_accepted_along_the_deepest_path():
    tokens = np.array([1, 7, 8, 3, 4, 3, 5])
    # root predicts 7 (node 1), node 1 predicts 3 (node 3), node 3 predicts 5 (node 6)
    acc = accept_greedy(TREE, tokens, logits_predicting([7, 3, 0, 5, 0, 0, 11]))
    assert acc.nodes.tolist() == [0, 1, 3, 6] and acc.next_token == 11


def test_greedy_partial_path_on_a_side_branch():
    tokens = np.array([1, 7, 8, 3, 4, 3, 5])
    # root predicts 8 (node 2, rank 1), node 2 predicts 3 (node 5), node 5 predicts 10
    acc = accept_greedy(TREE, tokens, logits_predicting([8, 0, 3, 0, 0, 10, 0]))
    assert acc.nodes.tolist() == [0, 2, 5] and acc.next_token == 10


def test_typical_acceptance_matches_the_formula():
    rng = np.random.default_rng(0)
    tokens = np.array([1, 7, 8, 3, 4, 3, 5])
    logits = rng.normal(size=(TREE.size, V)).astype(np.float32) * 2
    params = SamplingParams(temperature=0.8, seed=0)
    threshold, alpha = 0.09, 0.3
    acc = accept_typical(TREE, tokens, logits, params, np.random.default_rng(0), threshold, alpha)
    # reference: walk each root-to-leaf path by hand
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / 0.8, dim=-1).numpy()
    entropy = -(probs * np.log(probs)).sum(-1)
    ok_node = {}
    for node in range(1, TREE.size):
        parent = TREE.parents[node]
        limit = min(threshold, alpha * np.exp(-entropy[parent]))
        ok_node[node] = probs[parent, tokens[node]] > limit
    best = []
    for row in TREE.retrieve:
        path = [0]
        for node in row[1:]:
            if node < 0 or not ok_node[node]:
                break
            path.append(int(node))
        if len(path) > len(best):
            best = path
    assert acc.nodes.tolist() == best


def test_typical_accepts_a_confident_candidate_and_rejects_an_unlikely_one():
    tree = build_tree_buffers(chain_tree(2), topk=1)
    tokens = np.array([1, 4, 6])
    logits = np.full((3, V), -10.0, dtype=np.float32)
    logits[0, 4] = 10.0  # root is sure of 4
    logits[1, 5] = 10.0  # node 1 is sure of 5, candidate is 6
    acc = accept_typical(tree, tokens, logits, SamplingParams(temperature=1.0),
                         np.random.default_rng(0))
    assert acc.nodes.tolist() == [0, 1] and acc.next_token == 5


@pytest.fixture(scope="module")
def random_heads_dir(tiny_dir, tmp_path_factory) -> Path:
    """Heads with random (bad) weights: their proposals are mostly wrong."""
    return save_random_heads(tiny_dir, tmp_path_factory.mktemp("random_heads"), seed=1,
                             std=0.5)


def export_with(tiny_dir, heads_dir, tmp_path, tree="cpu", capacity=768) -> Path:
    from edgert.export.exporter import ExportOptions, export_model

    out = tmp_path / f"art-{tree}-{capacity}"
    export_model(str(tiny_dir), out, ExportOptions(max_context=capacity, heads=heads_dir,
                                                   tree=tree, medusa_topk=4),
                 log=lambda m: None)
    return out


PROMPTS = ["Explain what a loop is.", "Write a story about a robot.", "List some fruits",
           "What is 2 + 2?"]


@pytest.mark.parametrize("tree", ["chain", "cpu"])
def test_medusa_greedy_is_lossless_with_random_heads(tiny_dir, random_heads_dir, tmp_path,
                                                     tree):
    engine = edgert.load(export_with(tiny_dir, random_heads_dir, tmp_path, tree))
    for prompt in PROMPTS:
        plain = engine.generate(prompt, max_new_tokens=256, medusa=False)
        fast = engine.generate(prompt, max_new_tokens=256, medusa=True)
        assert fast.output_ids == plain.output_ids, prompt
        assert fast.stats["steps"] <= plain.stats["steps"]


def test_medusa_greedy_is_lossless_with_good_heads(tiny_dir, tiny_reference, tmp_path):
    """Heads that predict well (distilled from this model): long accepted paths, same output."""
    from edgert.model.sources import load_model
    from edgert.train.distill import (
        DistillOptions,
        PromptEncoder,
        build_hf_model,
        generate_responses,
        hidden_and_targets,
    )
    from edgert.train.heads_loop import TrainOptions, train_heads

    loaded = load_model(str(tiny_dir))
    model = build_hf_model(loaded)
    pairs = generate_responses(model, PromptEncoder(loaded), PROMPTS * 2,
                               DistillOptions(max_new_tokens=64, batch_size=8, sampled_share=0))
    data = hidden_and_targets(model, pairs, 3)
    heads = train_heads(data, loaded.lm_head_t(), TrainOptions(num_heads=3, steps=60,
                                                               batch_size=128, lr=1e-2))
    save_heads(heads, tmp_path / "good")
    engine = edgert.load(export_with(tiny_dir, tmp_path / "good", tmp_path, "cpu"))
    accepted = []
    for prompt in PROMPTS:
        plain = engine.generate(prompt, max_new_tokens=128, medusa=False)
        fast = engine.generate(prompt, max_new_tokens=128)
        assert fast.output_ids == plain.output_ids, prompt
        accepted.append(fast.stats["mean_accepted"])
    assert np.mean(accepted) > 1.5  # the test exercises multi-token acceptance


def test_eos_inside_an_accepted_path_ends_the_output(tiny_dir, random_heads_dir, tmp_path):
    engine = edgert.load(export_with(tiny_dir, random_heads_dir, tmp_path, "chain"))
    eos = engine.manifest.tokenizer.eos_token_ids[0]
    plain = engine.generate("Tell me a story", max_new_tokens=40, medusa=False)
    # heads that always propose plain greedy's continuation with EOS spliced in: the tree
    # accepts a path containing EOS, and nothing after it may be emitted
    backend = engine.backend
    original_forward, original_heads = backend.forward, backend.medusa_topk
    script = plain.output_ids[:5] + [eos] + plain.output_ids[5:]

    def forward(step):
        out = original_forward(step)
        if step.input_ids.shape[1] > 1 and step.past_len > 0:  # tree steps: follow the script
            done = step.past_len - len(plain.prompt_ids) + 1
            for node in range(step.input_ids.shape[1]):
                depth = int(step.position_ids[0, node] - step.past_len)
                nxt = script[min(done + depth, len(script) - 1)]
                out.logits[node] = -1e9
                out.logits[node, nxt] = 0.0
        return out

    def heads(hidden, roots):
        ids, logits = original_heads(hidden, roots)
        done = engine.cache.length - len(plain.prompt_ids) + 1
        for i in range(ids.shape[0]):
            ids[i, :, 0] = script[min(done + i, len(script) - 1)]
        return ids, logits

    backend.forward, backend.medusa_topk = forward, heads
    try:
        result = engine.generate("Tell me a story", max_new_tokens=40)
    finally:
        backend.forward, backend.medusa_topk = original_forward, original_heads
    assert result.output_ids == plain.output_ids[:5] + [eos]
    assert result.stats["mean_accepted"] > 1


def test_capacity_running_out_mid_tree_falls_back_to_plain_steps(tiny_dir, random_heads_dir,
                                                                  tmp_path):
    engine = edgert.load(export_with(tiny_dir, random_heads_dir, tmp_path, "cpu", capacity=96))
    prompt_ids = engine.encode("Hello there")
    budget = engine.cache.capacity - len(prompt_ids)  # fills the cache exactly
    plain = engine.generate("Hello there", max_new_tokens=budget, medusa=False, temperature=1.0,
                            seed=4)
    fast = engine.generate("Hello there", max_new_tokens=budget, medusa=True)
    greedy = engine.generate("Hello there", max_new_tokens=budget, medusa=False)
    assert fast.output_ids == greedy.output_ids
    assert engine.cache.length <= engine.cache.capacity
    assert len(plain.output_ids) <= budget


def test_kv_bytes_and_buffer_fixed_across_medusa_runs(tiny_dir, random_heads_dir, tmp_path):
    engine = edgert.load(export_with(tiny_dir, random_heads_dir, tmp_path, "cpu"))
    storage = engine.cache.storage
    short = engine.generate("a", max_new_tokens=10)
    long = engine.generate("a", max_new_tokens=500, temperature=1.0, seed=0, chat=False)
    assert short.stats["kv_bytes"] == long.stats["kv_bytes"] == engine.cache.nbytes
    assert engine.cache.storage is storage


def test_medusa_refused_without_heads(tiny_engine):
    with pytest.raises(edgert.GenerationError, match="no Medusa heads"):
        tiny_engine.generate("hi", medusa=True)


def test_unknown_tree_name(tiny_dir, random_heads_dir, tmp_path):
    with pytest.raises(edgert.ConfigError, match="unknown tree"):
        export_with(tiny_dir, random_heads_dir, tmp_path, "bushy")
    tree_file = tmp_path / "t.json"
    tree_file.write_text(json.dumps({"choices": [[0], [0, 0], [1]]}))
    art = export_with(tiny_dir, random_heads_dir, tmp_path, str(tree_file))
    assert edgert.load(art).tree.size == 4
    shutil.rmtree(art)


def test_medusa_default_follows_the_tuned_prediction(tiny_dir, random_heads_dir, tmp_path):
    from edgert.artifact.io import update_manifest

    art = export_with(tiny_dir, random_heads_dir, tmp_path, "cpu")
    engine = edgert.load(art)
    assert engine.medusa_by_default  # untuned tree: Medusa on, with prompt lookup
    assert engine.generate("Hello", max_new_tokens=12).stats["speculative"] == "medusa+lookup"
    tree = dict(engine.manifest.tree)
    tree["tuned_for"] = {"predicted_tokens_per_s": 30.0, "plain_tokens_per_s": 35.0}
    update_manifest(art, {"tree": tree})
    slower = edgert.load(art)
    assert not slower.medusa_by_default
    result = slower.generate("Hello", max_new_tokens=12)
    assert result.stats["speculative"] == "lookup"  # no heads by default
    assert set(result.stats["accepted_by"]) == {"lookup"}
    assert slower.generate("Hello", max_new_tokens=12, medusa=True).output_ids == \
        result.output_ids


COPY_PROMPT = ("Repeat this list exactly: apples, pears, plums, cherries, apples, pears, plums, "
               "cherries, apples, pears")


@pytest.fixture(scope="module")
def medusa_engine(tiny_dir, random_heads_dir, tmp_path_factory):
    return edgert.load(export_with(tiny_dir, random_heads_dir,
                                   tmp_path_factory.mktemp("spec"), "cpu"))


@pytest.mark.parametrize("mode", ["lookup", "medusa+lookup", "lookup+medusa"])
def test_lookup_modes_are_lossless(medusa_engine, mode):
    """Whatever lookup and the (random) heads propose, greedy output is plain greedy's; on a
    random model's repetitive output, copied candidates get accepted."""
    accepted = 0
    for prompt in [*PROMPTS, COPY_PROMPT]:
        plain = medusa_engine.generate(prompt, max_new_tokens=200, speculative="off")
        fast = medusa_engine.generate(prompt, max_new_tokens=200, speculative=mode)
        assert fast.output_ids == plain.output_ids, prompt
        assert fast.stats["speculative"] == mode
        assert fast.stats["steps"] <= plain.stats["steps"]
        accepted += fast.stats["accepted_by"]["lookup"]
        assert sum(fast.stats["accepted_by"].values()) >= len(fast.output_ids) - 1 - \
            fast.stats["steps"]  # every token beyond one a step was drafted by someone
    assert accepted > 0


def test_lookup_needs_no_heads(tiny_engine):
    plain = tiny_engine.generate(COPY_PROMPT, max_new_tokens=64, speculative="off")
    fast = tiny_engine.generate(COPY_PROMPT, max_new_tokens=64, speculative="lookup")
    assert fast.output_ids == plain.output_ids
    assert set(fast.stats["accepted_by"]) == {"lookup"}


def test_lookup_sampling_runs_and_is_reproducible(medusa_engine):
    """Typical acceptance over a lookup tree: seeded runs agree."""
    runs = [medusa_engine.generate(COPY_PROMPT, max_new_tokens=48, temperature=0.8, seed=3,
                                   speculative="medusa+lookup").output_ids for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0


@pytest.mark.parametrize("mode, match", [("bogus", "unknown speculative mode 'bogus'"),
                                         ("medusa+medusa", "names a drafter twice"),
                                         ("draft", "no draft layer"), ("", "must be a string")])
def test_bad_speculative_modes_are_named(medusa_engine, mode, match):
    with pytest.raises(edgert.GenerationError, match=match):
        medusa_engine.generate("hi", speculative=mode)


def test_medusa_and_speculative_together_are_refused(medusa_engine, tiny_engine):
    with pytest.raises(edgert.GenerationError, match="not both"):
        medusa_engine.generate("hi", speculative="lookup", medusa=True)
    with pytest.raises(edgert.GenerationError, match="no Medusa heads"):
        tiny_engine.generate("hi", speculative="medusa+lookup")


@pytest.fixture(scope="module")
def int8_engine(tiny_dir, random_heads_dir, tmp_path_factory):
    """4-bit weights and int8 activations (ONNX Runtime's accuracy level 4) with a branching
    Medusa tree."""
    from edgert.export.exporter import ExportOptions, export_model
    from edgert.export.quantize import WeightOptions

    out = tmp_path_factory.mktemp("int8") / "art"
    export_model(str(tiny_dir), out, ExportOptions(max_context=768, heads=random_heads_dir,
                                                   tree="cpu", medusa_topk=4,
                                                   weights=WeightOptions("q4", "int8")),
                 log=lambda m: None)
    return edgert.load(out)


def test_int8_activations_verify_chains_and_stay_lossless(int8_engine, monkeypatch):
    """At int8 activations a row's logits depend on the rows before it (masked or not), so
    plain steps run their attention as two rows (the graph pads a lone row) and every
    verification tree is a chain: all modes give plain greedy's tokens."""
    import edgert.runtime.engine as engine_module

    engine = int8_engine
    assert engine.row_exact and engine.decode_rows == 1
    assert engine.manifest.graphs[GraphKey.ORT_GQA].min_attention_rows == 2
    assert len(engine.tree.retrieve) > 1  # the artifact's own tree branches
    shapes = []
    real_accept = engine_module.accept

    def spy(tree, *args):
        shapes.append(tree.parents.tolist())
        return real_accept(tree, *args)

    monkeypatch.setattr(engine_module, "accept", spy)
    for prompt in [*PROMPTS, COPY_PROMPT]:
        plain = engine.generate(prompt, max_new_tokens=120, speculative="off")
        for mode in ("medusa", "lookup", "medusa+lookup"):
            assert engine.generate(prompt, max_new_tokens=120,
                                   speculative=mode).output_ids == plain.output_ids, mode
    assert shapes and all(p == list(range(-1, len(p) - 1)) for p in shapes)


def _first_two_tokens(tree, tokens, logits, params, acceptance, runs=20000):
    """Empirical distribution of the first token a step emits, and of the second given the
    first was candidate node 1's token."""
    from edgert.runtime.speculative import accept

    rng = np.random.default_rng(0)
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(runs):
        acc = accept(tree, tokens, logits, params, rng, 0.09, 0.3, acceptance)
        emitted = [*tokens[acc.nodes[1:]].tolist(), acc.next_token]
        first[emitted[0]] += 1
        if emitted[0] == tokens[1]:
            second[emitted[1]] += 1
    return first / first.sum(), second / max(second.sum(), 1)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9),
                                    SamplingParams(temperature=1.2, top_k=4),
                                    SamplingParams(temperature=0.8, top_p=0.7)], ids=str)
def test_rejection_acceptance_samples_the_backbone_distribution(params):
    """Over a branching tree, rejection acceptance emits tokens distributed as sampling from
    the filtered backbone distribution: the first token as at the root, the second (after
    node 1's token) as at node 1. 20,000 draws: the standard error of a frequency is <= 0.0036,
    the tolerance 0.015 is four of them."""
    from edgert.runtime.sampling import probabilities

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(TREE.size, V)).astype(np.float32) * 1.5
    tokens = np.array([1, 7, 8, 3, 4, 3, 5])  # node 1 (7) and node 2 (8) are root's children
    first, second = _first_two_tokens(TREE, tokens, logits, params, "rejection")
    np.testing.assert_allclose(first, probabilities(logits[0], params), atol=0.015)
    np.testing.assert_allclose(second, probabilities(logits[1], params), atol=0.015)


def test_typical_acceptance_keeps_to_top_k():
    """A candidate outside the top-k at its parent is never accepted, however likely the
    typical threshold finds it."""
    tree = build_tree_buffers(chain_tree(1), topk=1)
    logits = np.zeros((2, V), dtype=np.float32)
    logits[0, :3] = [3.0, 2.9, 2.8]  # candidate 2 is the third most likely
    tokens = np.array([1, 2])
    from edgert.runtime.speculative import accept_typical

    params = SamplingParams(temperature=1.0, top_k=2)
    acc = accept_typical(tree, tokens, logits, params, np.random.default_rng(0), 0.01, 1.0)
    assert acc.nodes.tolist() == [0] and acc.next_token in (0, 1)
    wide = accept_typical(tree, tokens, logits, SamplingParams(temperature=1.0),
                          np.random.default_rng(0), 0.01, 1.0)
    assert wide.nodes.tolist() == [0, 1]


def test_unknown_acceptance_is_named(tiny_engine):
    with pytest.raises(edgert.GenerationError, match="unknown acceptance 'greedy'"):
        tiny_engine.generate("hi", temperature=0.5, acceptance="greedy")


def test_top_k_1_under_speculation_is_greedy(medusa_engine):
    """Sampling with top_k=1 keeps only the argmax: every speculative mode then emits plain
    greedy's tokens, whatever the acceptance rule."""
    for prompt in PROMPTS[:2]:
        greedy = medusa_engine.generate(prompt, max_new_tokens=64, speculative="off")
        for acceptance in ("rejection", "typical"):
            sampled = medusa_engine.generate(prompt, max_new_tokens=64, temperature=0.9,
                                             top_k=1, seed=5, speculative="medusa+lookup",
                                             acceptance=acceptance)
            assert sampled.output_ids == greedy.output_ids, acceptance


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": "7"}, "seed must be a non-negative integer"),
    ({"typical_threshold": 2.0}, "typical_threshold must be a number in"),
    ({"typical_alpha": "x"}, "typical_alpha must be a number in"),
])
def test_bad_sampling_options_are_named(tiny_engine, kwargs, match):
    with pytest.raises(edgert.GenerationError, match=match):
        tiny_engine.generate("hi", temperature=0.5, **kwargs)
