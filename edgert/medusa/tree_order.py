"""A token tree as DFS intervals: the form edgert's tree-attention kernels take it in.

Each of the n new tokens gets ``order[i] = (pre_i, pre_i + subtree_size_i)`` in DFS pre-order,
so that token j is an ancestor-or-self of token i exactly when ``pre_j <= pre_i < pre_j +
size_j``: two int32 per token instead of an n x n mask. A causal chunk is the chain
0 -> 1 -> ... -> n-1, ``order[i] = (i, n)``. The compiled kernels read it
(``edgert.passes.tir.tree_attention``); the TVM backend builds it for every step.
"""

from __future__ import annotations

import numpy as np


def tree_order_from_parents(parents: np.ndarray) -> np.ndarray:
    """[n, 2] int32 DFS intervals from parent indices (-1 for nodes whose parent is cached)."""
    n = len(parents)
    children: list[list[int]] = [[] for _ in range(n)]
    roots = []
    for i, p in enumerate(parents):
        (roots if p < 0 else children[int(p)]).append(i)
    order = np.zeros((n, 2), dtype=np.int32)
    counter = 0
    stack = [(r, False) for r in reversed(roots)]
    while stack:
        node, done = stack.pop()
        if done:
            order[node, 1] = counter
            continue
        order[node, 0] = counter
        counter += 1
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(children[node]))
    return order


def causal_order(n: int) -> np.ndarray:
    return np.stack([np.arange(n), np.full(n, n)], axis=1).astype(np.int32)


def parents_from_mask(mask: np.ndarray) -> np.ndarray:
    """Nearest visible earlier new token (the parent) per row of an ancestor mask."""
    visible = mask[0, 0] == 0
    q = visible.shape[0]
    parents = np.full(q, -1, dtype=np.int64)
    for i in range(q):
        earlier = np.flatnonzero(visible[i, :i])
        parents[i] = earlier[-1] if len(earlier) else -1
    return parents
