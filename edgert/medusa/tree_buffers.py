"""The Medusa token tree as data, and the buffers one verification step needs.

A tree is a list of paths of top-k ranks (Medusa's ``medusa_choices``): ``(0,)`` is head 0's
best candidate, ``(0, 2)`` head 1's third candidate placed after head 0's best, and so on.
Node 0 is the root: the token the backbone itself chose last step. Every path's prefixes must be
in the tree too.

    choices [(0,), (1,), (0, 0)], topk 10:

    node  path    depth  parent  tree_index (into [root, head0 top-k, head1 top-k, ...])
    0     ()      0      -1      0
    1     (0,)    1      0       1 + 0*10 + 0 = 1
    2     (1,)    1      0       1 + 0*10 + 1 = 2
    3     (0, 0)  2      1       1 + 1*10 + 0 = 11

    ancestor mask (row sees column):      retrieve paths (root to leaf, -1 padded):
        0 1 2 3                               [0, 1, 3]
    0   x                                     [0, 2, -1]
    1   x x
    2   x   x
    3   x x   x
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from edgert.errors import ConfigError

Path = tuple[int, ...]


@dataclass(frozen=True)
class TreeBuffers:
    paths: tuple[Path, ...]  # sorted: by depth, then lexicographically; node i+1 is paths[i]
    topk: int
    parents: np.ndarray  # [N+1] int64, -1 for the root
    depths: np.ndarray  # [N+1] int64 (position offsets)
    ancestor_mask: np.ndarray  # [N+1, N+1] bool: row node may attend column node
    tree_indices: np.ndarray  # [N+1] int64 into the flat candidate vector
    retrieve: np.ndarray  # [leaves, max_depth+1] int64 node ids root->leaf, -1 padded

    @property
    def size(self) -> int:
        """Nodes including the root (the verification forward's q)."""
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    def additive_mask(self, value: float = -1e9) -> np.ndarray:
        """[1,1,N+1,N+1] float32 tree mask for the decode graph."""
        mask = np.where(self.ancestor_mask, 0.0, value).astype(np.float32)
        return mask[None, None]


def normalize_paths(choices) -> tuple[Path, ...]:
    """Validate and sort tree paths; raises ConfigError naming the bad path."""
    paths = []
    for raw in choices:
        try:
            path = tuple(int(k) for k in raw)
        except (TypeError, ValueError):
            raise ConfigError(f"tree path {raw!r} is not a list of integers") from None
        if not path or min(path) < 0:
            raise ConfigError(f"tree path {raw!r} must be a non-empty list of ranks >= 0")
        paths.append(path)
    unique = set(paths)
    if len(unique) != len(paths):
        raise ConfigError("the tree lists a path twice")
    for path in paths:
        if len(path) > 1 and path[:-1] not in unique:
            raise ConfigError(f"tree path {list(path)} has no parent {list(path[:-1])}; every "
                              "prefix of a path must be in the tree")
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


def build_tree_buffers(choices, topk: int, num_heads: int | None = None) -> TreeBuffers:
    """Tree paths -> parents, depths, ancestor mask, candidate indices and retrieve paths."""
    paths = normalize_paths(choices)
    if paths and max(max(p) for p in paths) >= topk:
        raise ConfigError(f"the tree uses rank {max(max(p) for p in paths)} but the heads "
                          f"return only top-{topk}; re-export with a larger --medusa-topk")
    depth = max((len(p) for p in paths), default=0)
    if num_heads is not None and depth > num_heads:
        raise ConfigError(f"the tree is {depth} deep but there are only {num_heads} heads")
    node_of = {(): 0, **{p: i + 1 for i, p in enumerate(paths)}}
    parents = np.array([-1] + [node_of[p[:-1]] for p in paths], dtype=np.int64)
    tree_indices = np.array([0] + [1 + (len(p) - 1) * topk + p[-1] for p in paths],
                            dtype=np.int64)
    return tree_from_parents(parents, paths, topk, tree_indices)


def tree_from_parents(parents: np.ndarray, paths: tuple[Path, ...] = (), topk: int = 0,
                      tree_indices: np.ndarray | None = None) -> TreeBuffers:
    """The buffers of a tree given by its parents (node 0 the root, -1; every parent listed
    before its children): depths, ancestor mask and root-to-leaf retrieve paths. A tree built
    per step from drafted tokens (``medusa.token_tree``) has no rank paths."""
    parents = np.asarray(parents, dtype=np.int64)
    n = len(parents)
    depths = np.zeros(n, dtype=np.int64)
    mask = np.eye(n, dtype=bool)
    for node in range(1, n):
        parent = int(parents[node])
        depths[node] = depths[parent] + 1
        mask[node] |= mask[parent]
    is_parent = np.zeros(n, dtype=bool)
    is_parent[parents[1:]] = True
    leaves = np.flatnonzero(~is_parent)
    retrieve = np.full((len(leaves), int(depths.max()) + 1), -1, dtype=np.int64)
    for row, leaf in enumerate(leaves):
        chain = np.flatnonzero(mask[leaf])  # ancestors-or-self, in node (= depth) order
        retrieve[row, :len(chain)] = chain
    if tree_indices is None:
        tree_indices = np.arange(n, dtype=np.int64)
    return TreeBuffers(paths, topk, parents, depths, mask, tree_indices, retrieve)


def chain_tree(length: int) -> list[list[int]]:
    """Top-1 of each head in a chain: [[0], [0, 0], ...]."""
    return [[0] * d for d in range(1, length + 1)]


def greedy_tree(rank_accuracy: np.ndarray, size: int) -> list[list[int]]:
    """The Medusa paper's construction: the ``size`` paths of highest expected acceptance.

    ``rank_accuracy[i, r]`` is the probability that head i's candidate of rank r is the right
    token. A path's value is the product of its ranks' accuracies (heads assumed independent);
    the expected accepted length of a tree is 1 + the sum of its paths' values. Values shrink
    along a path, so taking the best paths in order keeps every prefix in the tree.
    """
    heads, topk = rank_accuracy.shape
    best: list[tuple[float, Path]] = []
    frontier = [(-float(rank_accuracy[0, r]), (r,)) for r in range(topk)]
    heapq.heapify(frontier)
    while frontier and len(best) < size:
        neg, path = heapq.heappop(frontier)
        best.append((-neg, path))
        if len(path) < heads:
            for r in range(topk):
                heapq.heappush(frontier, (neg * float(rank_accuracy[len(path), r]), path + (r,)))
    return [list(p) for _, p in sorted(best, key=lambda vp: (len(vp[1]), vp[1]))]


def expected_accept_length(rank_accuracy: np.ndarray, choices) -> float:
    """1 (the backbone's own token) + the sum over paths of the product of rank accuracies."""
    total = 1.0
    for path in normalize_paths(choices):
        total += float(np.prod([rank_accuracy[d, r] for d, r in enumerate(path)]))
    return total
