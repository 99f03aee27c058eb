"""EAGLE-2-style dynamic draft trees: grow the most confident branches, keep the best nodes.

The draft layer's first call gives the root's top-k children with their log-probabilities.
Each further depth expands the ``beam`` most confident nodes of the depth before (one draft call
of ``beam`` rows), each adding its top-k children. A node's score is the sum of the
log-probabilities along its path: the draft's estimate of the chance that verification accepts
it. Finally the ``budget`` best-scoring nodes form the verification tree; a child never scores
above its parent, and a node joins only after its parent, so the tree is closed under
ancestors::

    root ─┬─ a (-0.1) ─┬─ c (-0.3)        budget 3 keeps a, c, b (the three best scores)
          │            └─ d (-1.9)
          └─ b (-0.9) ── e (-2.5)

Pure bookkeeping here; ``edgert.runtime.draft`` runs the draft calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgert.artifact.manifest import DRAFT_TREE_FIELDS


@dataclass(frozen=True)
class DraftTreeParams:
    """``depth``: draft calls after the first (tree depth); ``beam``: nodes expanded per depth;
    ``topk``: children per expanded node; ``budget``: nodes verified (the root excluded)."""

    depth: int = 4
    beam: int = 2
    topk: int = 2
    budget: int = 6

    def __post_init__(self) -> None:
        for name in DRAFT_TREE_FIELDS:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"draft tree {name} must be a positive integer, got "
                                 f"{getattr(self, name)!r}")


@dataclass
class DraftTree:
    """Drafted nodes under the root (node 0): token, parent, depth, cumulative log-prob."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    scores: list[float] = field(default_factory=lambda: [0.0])

    @classmethod
    def rooted(cls, root: int) -> DraftTree:
        return cls([int(root)])

    @property
    def size(self) -> int:
        return len(self.tokens)

    def add_children(self, parent: int, ids, logprobs) -> list[int]:
        """Children of ``parent`` for each (token, log-prob); their indices."""
        start = self.size
        for token, logprob in zip(np.asarray(ids).tolist(), np.asarray(logprobs).tolist()):
            self.tokens.append(int(token))
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1)
            self.scores.append(self.scores[parent] + float(logprob))
        return list(range(start, self.size))

    def best(self, nodes: list[int], count: int) -> list[int]:
        """The ``count`` best-scoring of ``nodes`` (ties: the earlier node), best first."""
        return sorted(nodes, key=lambda n: (-self.scores[n], n))[:count]

    def ancestors(self, node: int) -> list[int]:
        """The drafted nodes on the path from the root to ``node`` (root excluded), in order."""
        path = []
        while node > 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def select(self, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """The verification tree: the ``budget`` best nodes, each after its parent, as
        (parents [M+1], tokens [M+1]) with node 0 the root (``TokenTreeBuilder.add``'s
        form)."""
        kept: dict[int, int] = {0: 0}  # drafted node -> position in the selection
        for node in self.best(list(range(1, self.size)), self.size):
            if len(kept) > budget:
                break
            if self.parents[node] in kept:  # its parent scored at least as well: already in
                kept[node] = len(kept)
        order = sorted(kept, key=kept.get)
        parents = np.array([-1] + [kept[self.parents[n]] for n in order[1:]], dtype=np.int64)
        tokens = np.array([self.tokens[n] for n in order], dtype=np.int64)
        return parents, tokens
