"""Dynamic draft trees: expansion bookkeeping and the selection, against hand-checked trees."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgert.speculative.dynamic_tree import DraftTree, DraftTreeParams
from edgert.speculative.token_tree import TokenTreeBuilder


def docstring_tree() -> DraftTree:
    """root ─┬─ a (-0.1) ─┬─ c (-0.3)
             │            └─ d (-1.9)
             └─ b (-0.9) ── e (-2.5)      (tokens a..e = 10..14, root 7)"""
    tree = DraftTree.rooted(7)
    a, b = tree.add_children(0, [10, 11], [-0.1, -0.9])
    tree.add_children(a, [12, 13], [-0.2, -1.8])
    tree.add_children(b, [14], [-1.6])
    return tree


def test_scores_are_path_sums():
    tree = docstring_tree()
    assert tree.tokens == [7, 10, 11, 12, 13, 14]
    assert tree.parents == [-1, 0, 0, 1, 1, 2]
    assert tree.depths == [0, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(tree.scores, [0, -0.1, -0.9, -0.3, -1.9, -2.5])
    assert tree.ancestors(4) == [1, 4]
    assert tree.best([1, 2, 3, 4, 5], 2) == [1, 3]


@pytest.mark.parametrize("budget, parents, tokens", [
    (1, [-1, 0], [7, 10]),  # a
    (2, [-1, 0, 1], [7, 10, 12]),  # a, c
    (3, [-1, 0, 1, 0], [7, 10, 12, 11]),  # a, c, b
    (4, [-1, 0, 1, 0, 1], [7, 10, 12, 11, 13]),  # + d (-1.9)
    (9, [-1, 0, 1, 0, 1, 3], [7, 10, 12, 11, 13, 14]),  # all, e under b
])
def test_selection_keeps_the_best_nodes_closed_under_ancestors(budget, parents, tokens):
    got_parents, got_tokens = docstring_tree().select(budget)
    assert got_parents.tolist() == parents
    assert got_tokens.tolist() == tokens


def test_a_child_never_precedes_its_parent_even_on_ties():
    tree = DraftTree.rooted(1)
    (a,) = tree.add_children(0, [2], [-0.5])
    tree.add_children(a, [3, 4], [0.0, -0.1])  # child c ties with a
    parents, tokens = tree.select(2)
    assert parents.tolist() == [-1, 0, 1] and tokens.tolist() == [1, 2, 3]


def test_selection_feeds_the_token_tree():
    parents, tokens = docstring_tree().select(3)
    builder = TokenTreeBuilder(7)
    builder.add("draft", parents, tokens)
    builder.add_chain("lookup", [10, 12, 99])  # shares a -> c, adds one node
    tree = builder.build()
    assert tree.tokens.tolist() == [7, 10, 12, 11, 99]
    assert tree.proposed_by(np.arange(1, 5)) == {"medusa": 0, "lookup": 3, "draft": 3}


def test_probability_reading_of_scores():
    """exp(score) is the product of the draft's probabilities along the path."""
    tree = DraftTree.rooted(0)
    (a,) = tree.add_children(0, [1], [math.log(0.5)])
    (b,) = tree.add_children(a, [2], [math.log(0.25)])
    assert math.exp(tree.scores[b]) == pytest.approx(0.125)


def test_params_are_checked():
    with pytest.raises(ValueError, match="budget"):
        DraftTreeParams(budget=0)
