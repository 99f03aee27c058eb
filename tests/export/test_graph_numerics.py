"""The exported graphs against the torch reference (transformers' Llama), atol 1e-4.

Covers the three kinds of step the runtime makes: causal prefill, single-token decode, and a
tree-shaped step (each tree token sees the prefix plus its ancestors only).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgert.runtime.backends import StepInputs
from edgert.runtime.steps import MASK_VALUE, causal_mask

ATOL = 1e-4
PARENTS = [-1, 0, 0, 1, 2, 3]  # a small tree over 6 new tokens


def reference_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def tree_mask_and_depth(parents: list[int]) -> tuple[np.ndarray, np.ndarray]:
    q = len(parents)
    mask = np.full((q, q), MASK_VALUE, dtype=np.float32)
    depth = np.zeros(q, dtype=np.int64)
    for i in range(q):
        j = i
        while j >= 0:
            mask[i, j] = 0.0
            j = parents[j]
        depth[i] = 0 if parents[i] < 0 else depth[parents[i]] + 1
    return mask[None, None], depth


def path_to(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def assert_tree_rows(logits, reference, prefix, tree_tokens, label: str = "") -> None:
    """Each tree node's logits row equals the reference's last row after the prefix and the
    node's ancestry path (PARENTS), atol ATOL."""
    for node in range(len(PARENTS)):
        seq = prefix + [tree_tokens[j] for j in path_to(PARENTS, node)]
        np.testing.assert_allclose(logits[node], reference_logits(reference, seq)[-1],
                                   atol=ATOL, err_msg=f"{label} tree node {node}")


@pytest.fixture()
def engine(tiny_engine):
    tiny_engine.cache.reset()
    return tiny_engine


def run_step(engine, ids, positions, mask):
    cache = engine.cache
    q = len(ids)
    out = engine.backend.forward(StepInputs(
        np.array([ids], dtype=np.int64), np.array([positions], dtype=np.int64), mask,
        np.arange(q, dtype=np.int64), cache.length))
    return out


def test_prefill_matches_reference(engine, tiny_reference):
    ids = [5, 77, 301, 12, 9, 150, 42, 8]
    out = run_step(engine, ids, list(range(len(ids))), causal_mask(len(ids)))
    np.testing.assert_allclose(out.logits, reference_logits(tiny_reference, ids), atol=ATOL)


def test_single_token_decode_matches_reference(engine, tiny_reference):
    ids = [5, 77, 301, 12, 9, 150, 42, 8]
    run_step(engine, ids[:-1], list(range(len(ids) - 1)), causal_mask(len(ids) - 1))
    engine.cache.advance(len(ids) - 1)
    out = run_step(engine, ids[-1:], [len(ids) - 1], causal_mask(1))
    np.testing.assert_allclose(out.logits[0], reference_logits(tiny_reference, ids)[-1], atol=ATOL)


def test_tree_step_matches_reference(engine, tiny_reference):
    prefix = [5, 77, 301, 12, 9]
    tree_tokens = [40, 41, 42, 43, 44, 45]
    run_step(engine, prefix, list(range(len(prefix))), causal_mask(len(prefix)))
    engine.cache.advance(len(prefix))
    mask, depth = tree_mask_and_depth(PARENTS)
    out = run_step(engine, tree_tokens, list(len(prefix) + depth), mask)
    assert_tree_rows(out.logits, tiny_reference, prefix, tree_tokens)


def test_portable_graph_tree_step_matches_reference(tiny_artifact, tiny_reference):
    """model.onnx (standard ops, the TVM input) with an explicit past."""
    session = ort.InferenceSession(str(tiny_artifact / "model.onnx"))
    prefix = [5, 77, 301, 12, 9]
    tree_tokens = [40, 41, 42, 43, 44, 45]
    feeds = {"input_ids": np.array([prefix]), "position_ids": np.arange(len(prefix))[None],
             "tree_mask": causal_mask(len(prefix)),
             "logits_index": np.arange(len(prefix), dtype=np.int64)}
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_")]
    for name in past_names:
        feeds[name] = np.zeros((1, 2, 0, 16), dtype=np.float32)
    outputs = session.run(None, feeds)
    presents = outputs[2:]
    np.testing.assert_allclose(outputs[0][0], reference_logits(tiny_reference, prefix), atol=ATOL)
    mask, depth = tree_mask_and_depth(PARENTS)
    feeds = {"input_ids": np.array([tree_tokens]), "position_ids": (len(prefix) + depth)[None],
             "tree_mask": mask, "logits_index": np.arange(len(tree_tokens), dtype=np.int64)}
    feeds.update(dict(zip(past_names, presents)))
    logits = session.run(["logits"], feeds)[0][0]
    assert_tree_rows(logits, tiny_reference, prefix, tree_tokens)


def test_graphs_use_standard_ops_only(tiny_artifact):
    import onnx

    model = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False)
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert max(op.version for op in model.opset_import) >= 17


def test_lm_head_stored_once(tiny_artifact, tiny_dir):
    """Tied embeddings: one [H,V] tensor serves as embedding table and output projection."""
    import json

    import onnx

    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    model = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False)
    vocab_sized = [i.name for i in model.graph.initializer if vocab in list(i.dims)]
    assert vocab_sized == ["lm_head_t"]
