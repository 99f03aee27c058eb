"""`edgert tune-tree --drafter draft`: the draft layer's tree chosen from simulated acceptance
and measured cost, stored in the manifest, read by the engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgert
from edgert.errors import ArtifactError, ConfigError
from edgert.speculative.dynamic_tree import DraftTreeParams
from edgert.train.tune_draft_tree import (
    accepted_length,
    candidate_shapes,
    choose_draft_tree,
    fit_latency,
    tune_draft_tree,
)
from tests.runtime.drafts import TRAIN_PROMPTS, export

#   root(0) ─┬─ 5 (1) ── 9 (3) ── 4 (4)
#            └─ 7 (2)
PARENTS = np.array([-1, 0, 0, 1, 3])
TOKENS = np.array([11, 5, 7, 9, 4])


@pytest.mark.parametrize("continuation, length", [
    ([5, 9, 4, 2], 3), ([5, 9, 8], 2), ([7, 9], 1), ([8, 5], 0), ([5], 1), ([], 0)])
def test_accepted_length_by_hand(continuation, length):
    assert accepted_length(PARENTS, TOKENS, continuation) == length


def test_candidates():
    chains = candidate_shapes(4, chains_only=True)
    assert chains == [(1, 1, 1), (2, 1, 1), (3, 1, 1), (4, 1, 1)]
    trees = candidate_shapes(4, chains_only=False)
    assert set(chains) < set(trees) and (1, 1, 4) in trees and (3, 2, 3) in trees
    assert all(beam <= topk for _, beam, topk in trees)
    assert max(topk for _, _, topk in candidate_shapes(2, chains_only=False)) == 2


def test_fit_latency_recovers_a_line():
    measured = {1: 20.0, 3: 22.0, 9: 28.0}
    fitted = fit_latency(measured, range(1, 6))
    assert fitted[1] == pytest.approx(20.0) and fitted[5] == pytest.approx(24.0)


def test_choice_trades_acceptance_against_cost():
    """Deeper trees accept more but cost more rows: the choice is the best ratio."""
    latency = {q: 20.0 + 2.0 * q for q in range(1, 10)}  # 2 ms per verified row
    stats = {(1, 1, 1): {"accepted": {1: [1, 0, 1, 0]}, "draft_ms": 0.5},      # 1.5 tokens
             (3, 1, 1): {"accepted": {3: [3, 0, 3, 0]}, "draft_ms": 1.5},      # 2.5 tokens
             (2, 2, 2): {"accepted": {1: [0, 0, 0, 0], 6: [2, 2, 2, 1]}, "draft_ms": 1.0}}
    best, curve = choose_draft_tree(stats, latency)
    speeds = {(c.params.depth, c.params.budget): c.tokens_per_s for c in curve}
    assert speeds[(1, 1)] == pytest.approx(1e3 * 1.5 / (24.0 + 0.5))
    assert speeds[(3, 3)] == pytest.approx(1e3 * 2.5 / (28.0 + 1.5))
    assert speeds[(2, 6)] == pytest.approx(1e3 * 2.75 / (34.0 + 1.0))
    assert best.params == DraftTreeParams(3, 1, 1, 3)


@pytest.fixture(scope="module")
def tuned(tiny_dir, trained_draft_dir, tmp_path_factory):
    art = export(tiny_dir, tmp_path_factory.mktemp("tune") / "art", trained_draft_dir,
                 draft_weights="fp32")
    engine = edgert.load(art)
    record = tune_draft_tree(engine, TRAIN_PROMPTS[:4], max_nodes=6, new_tokens=24)
    return art, engine, record


def test_the_chain_simulation_is_eval_drafts_step_1(tuned):
    """A one-token chain's mean accepted length is the draft's step-1 top-1 that
    `edgert eval-draft` reports on the same prompts: the same definition, computed apart."""
    from edgert.train.eval_draft import evaluate_draft

    art, engine, record = tuned
    step1 = evaluate_draft(edgert.load(art), TRAIN_PROMPTS[:4], 24, depth=1).top1[0]
    chain = next(c for c in record["curve"]
                 if (c["depth"], c["beam"], c["topk"], c["budget"]) == (1, 1, 1, 1))
    assert chain["expected_tokens"] == pytest.approx(1 + step1, abs=1e-3)


def test_the_tuned_tree_is_stored_and_used(tuned):
    art, engine, record = tuned
    chosen = DraftTreeParams(*(record[k] for k in ("depth", "beam", "topk", "budget")))
    assert not record["tuned_for"]["chains_only"]  # fp32: dynamic trees
    best = max(record["curve"], key=lambda c: c["tokens_per_s"])
    assert (best["depth"], best["beam"], best["topk"], best["budget"]) == tuple(
        record[k] for k in ("depth", "beam", "topk", "budget"))
    manifest = json.loads((art / "edgert.json").read_text())
    assert manifest["draft"]["tree"]["budget"] == chosen.budget
    assert engine.draft_tree == chosen
    reloaded = edgert.load(art)
    assert reloaded.draft_tree == chosen and reloaded.draft_depth == chosen.depth
    for prompt in TRAIN_PROMPTS[4:7]:
        assert (reloaded.generate(prompt, max_new_tokens=32, speculative="draft").output_ids
                == reloaded.generate(prompt, max_new_tokens=32, speculative="off").output_ids)


def test_int8_artifacts_tune_chains(tiny_dir, trained_draft_dir, tmp_path):
    """Verification takes chains only at int8 activations: the candidates are chains and the
    tuned depth is the chain's length."""
    from edgert.export.quantize import WeightOptions

    art = export(tiny_dir, tmp_path / "q4", trained_draft_dir,
                 weights=WeightOptions(weights="q4"))
    engine = edgert.load(art)
    assert engine.row_exact
    record = tune_draft_tree(engine, TRAIN_PROMPTS[:2], max_nodes=4, new_tokens=16,
                             write=False)
    assert record["tuned_for"]["chains_only"]
    assert {(c["beam"], c["topk"]) for c in record["curve"]} == {(1, 1)}
    assert all(c["budget"] == c["depth"] for c in record["curve"])


def test_a_malformed_tree_is_refused(tuned, tmp_path):
    import shutil

    art, _, _ = tuned
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    manifest = json.loads((copy / "edgert.json").read_text())
    manifest["draft"]["tree"]["budget"] = 0
    (copy / "edgert.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="draft.tree.budget must be a positive integer"):
        edgert.load(copy, verify=False)


def test_export_applies_the_draft_directorys_tuned_trees(tiny_dir, trained_draft_dir,
                                                         tmp_path):
    """A draft directory's tree.json ("tree" for trees, "chain" for int8 artifacts) goes into
    the manifest, and the draft cache holds the rows it drafts; --no-draft-tree leaves it out;
    a malformed file is refused naming the fix."""
    import shutil

    from edgert.export.quantize import WeightOptions

    draft = tmp_path / "draft"
    shutil.copytree(trained_draft_dir, draft)
    tree = {"depth": 4, "beam": 2, "topk": 3, "budget": 5, "tuned_for": {"chains_only": False}}
    chain = {"depth": 2, "beam": 1, "topk": 1, "budget": 2, "tuned_for": {"chains_only": True}}
    (draft / "tree.json").write_text(json.dumps({"tree": tree, "chain": chain}))
    fp32 = export(tiny_dir, tmp_path / "fp32", draft)
    manifest = json.loads((fp32 / "edgert.json").read_text())
    assert manifest["draft"]["tree"] == tree
    assert manifest["draft"]["kv_cache"]["capacity"] == manifest["kv_cache"]["capacity"] + 7
    assert edgert.load(fp32).draft_tree == DraftTreeParams(4, 2, 3, 5)
    q4 = export(tiny_dir, tmp_path / "q4", draft, weights=WeightOptions(weights="q4"))
    engine = edgert.load(q4)
    assert json.loads((q4 / "edgert.json").read_text())["draft"]["tree"] == chain
    assert engine.verifies_chains and engine.draft_depth == 2
    plain = export(tiny_dir, tmp_path / "plain", draft, use_draft_tree=False)
    assert "tree" not in json.loads((plain / "edgert.json").read_text())["draft"]
    (draft / "tree.json").write_text(json.dumps({"tree": {"depth": 0}}))
    with pytest.raises(ConfigError, match="tree.json is not a tuned draft tree file"):
        export(tiny_dir, tmp_path / "bad", draft)


def test_a_tree_tuned_for_another_engine_is_not_used(tuned, tmp_path):
    """An engine that verifies trees ignores a record tuned for chains, and one tuned on
    another backend (it keeps its defaults)."""
    import shutil

    art, _, _ = tuned
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    manifest = json.loads((copy / "edgert.json").read_text())
    manifest["draft"]["tree"] = {"depth": 3, "beam": 1, "topk": 1, "budget": 3,
                                 "tuned_for": {"chains_only": True}}
    (copy / "edgert.json").write_text(json.dumps(manifest))
    engine = edgert.load(copy, verify=False)
    assert not engine.verifies_chains and engine.draft_depth == manifest["draft"]["depth"]
    manifest["draft"]["tree"] = {"depth": 3, "beam": 1, "topk": 2, "budget": 3,
                                 "tuned_for": {"chains_only": False, "backend": "tvm"}}
    (copy / "edgert.json").write_text(json.dumps(manifest))
    engine = edgert.load(copy, verify=False)  # ONNX Runtime: a tree tuned for TVM is not its
    assert engine.draft_depth == manifest["draft"]["depth"]
    manifest["draft"]["tree"]["tuned_for"]["backend"] = "ort"
    (copy / "edgert.json").write_text(json.dumps(manifest))
    assert edgert.load(copy, verify=False).draft_tree == DraftTreeParams(3, 1, 2, 3)


def test_the_medusa_tree_is_still_tuned(tiny_medusa_artifact):
    """`tune-tree --drafter medusa`: the heads' static tree, with the same summary fields."""
    from edgert.train.tune_tree import tune_tree

    engine = edgert.load(tiny_medusa_artifact)
    record = tune_tree(engine, TRAIN_PROMPTS[:2], max_nodes=4, max_new_tokens=16, write=False)
    assert 1 <= record["nodes"] <= 4 and len(record["choices"]) == record["nodes"]
    tuned = record["tuned_for"]
    assert tuned["plain_step_ms"] > 0 and tuned["heads_ms"] > 0
    assert set(tuned["forward_ms_by_q"]) >= {"1", "5"}
