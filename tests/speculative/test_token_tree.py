"""The per-step verification tree: the trie of the drafters' proposals."""

from __future__ import annotations

import numpy as np

from edgert.medusa.tree_buffers import build_tree_buffers
from edgert.speculative.token_tree import TokenTreeBuilder


def test_the_module_docstring_example():
    """medusa 7 -> 3 -> 9, 7 -> 4; lookup 7 -> 3 -> 5 -> 6: the shared 3 is one node."""
    builder = TokenTreeBuilder(7)
    builder.add("medusa", [-1, 0, 1, 0], [7, 3, 9, 4])
    builder.add_chain("lookup", [3, 5, 6])
    tree = builder.build()
    assert tree.tokens.tolist() == [7, 3, 9, 4, 5, 6]
    assert tree.buffers.parents.tolist() == [-1, 0, 1, 0, 1, 4]
    assert tree.buffers.depths.tolist() == [0, 1, 2, 1, 2, 3]
    assert tree.sources.tolist() == [0, 3, 1, 1, 2, 2]  # medusa 1, lookup 2
    mask = tree.buffers.ancestor_mask.astype(int)
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 0, 0, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0],
                             [1, 1, 0, 0, 1, 1]]
    assert tree.buffers.retrieve.tolist() == [[0, 1, 2, -1], [0, 3, -1, -1], [0, 1, 4, 5]]
    assert tree.proposed_by(np.array([1, 4, 5])) == {"medusa": 1, "lookup": 3, "draft": 0}


def test_a_drafted_tree_becomes_the_same_buffers_as_the_static_one():
    """The Medusa tree's own tokens (distinct per sibling) rebuild its parents, depths, mask
    and retrieve paths exactly."""
    static = build_tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], topk=2)
    tokens = np.array([100, 1, 2, 11, 12, 21, 111])
    builder = TokenTreeBuilder(100)
    builder.add("medusa", static.parents, tokens)
    tree = builder.build()
    assert tree.tokens.tolist() == tokens.tolist()
    for field in ("parents", "depths", "ancestor_mask", "retrieve"):
        np.testing.assert_array_equal(getattr(tree.buffers, field), getattr(static, field))


def test_repeated_chains_and_an_empty_chain_add_nothing():
    builder = TokenTreeBuilder(5)
    builder.add_chain("lookup", [])
    assert builder.size == 1
    builder.add_chain("lookup", [1, 2])
    builder.add_chain("medusa", [1, 2])
    tree = builder.build()
    assert tree.tokens.tolist() == [5, 1, 2] and tree.sources.tolist() == [0, 3, 3]
