"""Tree buffers on small trees checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.errors import ConfigError
from edgert.medusa.tree_buffers import (
    build_tree_buffers,
    chain_tree,
    expected_accept_length,
    greedy_tree,
)


def test_docstring_example():
    tree = build_tree_buffers([[1], [0, 0], [0]], topk=10)
    assert tree.paths == ((0,), (1,), (0, 0))
    assert tree.parents.tolist() == [-1, 0, 0, 1]
    assert tree.depths.tolist() == [0, 1, 1, 2]
    assert tree.tree_indices.tolist() == [0, 1, 2, 11]
    assert tree.ancestor_mask.astype(int).tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 1, 0, 1],
    ]
    assert tree.retrieve.tolist() == [[0, 2, -1], [0, 1, 3]]
    mask = tree.additive_mask()
    assert mask.shape == (1, 1, 4, 4) and mask[0, 0, 3, 2] == -1e9 and mask[0, 0, 3, 1] == 0


def test_chain():
    tree = build_tree_buffers(chain_tree(3), topk=1)
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.tree_indices.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(tree.ancestor_mask, np.tril(np.ones((4, 4), bool)))
    assert tree.retrieve.tolist() == [[0, 1, 2, 3]]


def test_wider_tree():
    choices = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    tree = build_tree_buffers(choices, topk=3, num_heads=3)
    # nodes: 1:(0) 2:(1) 3:(2) 4:(0,0) 5:(0,1) 6:(1,0) 7:(0,0,0)
    assert tree.parents.tolist() == [-1, 0, 0, 0, 1, 1, 2, 4]
    # depth-2 nodes index head 1's candidates: 1 + 1*3 + rank; (1,0) shares (0,0)'s token
    assert tree.tree_indices.tolist() == [0, 1, 2, 3, 4, 5, 4, 7]
    assert tree.tree_indices[7] == 1 + 2 * 3 + 0
    assert sorted(map(tuple, tree.retrieve.tolist())) == sorted([
        (0, 1, 4, 7), (0, 1, 5, -1), (0, 2, 6, -1), (0, 3, -1, -1)])
    assert tree.ancestor_mask[7].nonzero()[0].tolist() == [0, 1, 4, 7]


def test_root_only():
    tree = build_tree_buffers([], topk=4)
    assert tree.size == 1 and tree.retrieve.tolist() == [[0]]


@pytest.mark.parametrize("choices, match", [
    ([[0, 1]], "no parent"),
    ([[0], [0]], "twice"),
    ([[0], [-1]], ">= 0"),
    ([[0], [5]], "top-4"),
    ([["a"]], "integers"),
])
def test_invalid_trees(choices, match):
    with pytest.raises(ConfigError, match=match):
        build_tree_buffers(choices, topk=4)


def test_too_deep_for_heads():
    with pytest.raises(ConfigError, match="only 2 heads"):
        build_tree_buffers(chain_tree(3), topk=1, num_heads=2)


def test_greedy_tree_picks_highest_products():
    acc = np.array([[0.6, 0.2, 0.1], [0.4, 0.1, 0.05]])
    # values: (0)=.6 (1)=.2 (0,0)=.24 (2)=.1 (0,1)=.06 (1,0)=.08
    assert greedy_tree(acc, 3) == [[0], [1], [0, 0]]
    assert greedy_tree(acc, 5) == [[0], [1], [2], [0, 0], [1, 0]]
    assert expected_accept_length(acc, [[0], [1], [0, 0]]) == pytest.approx(1 + 0.6 + 0.2 + 0.24)
    build_tree_buffers(greedy_tree(acc, 6), topk=3, num_heads=2)  # always a valid tree
