"""The verification tree of one speculative step: the trie of every drafter's candidates.

Each drafter proposes a tree of tokens under the root (the token the backbone chose last
step): the Medusa heads their static tree of top-k candidates, prompt lookup a chain copied from
earlier text, a draft layer its own tree. The step verifies their union in one forward: the
trie in which a token path shared by several drafters is one node (one verification row), and
each node remembers which drafters proposed it (``sources``, a bit per drafter)::

    root 7   medusa: 7 -> 3 -> 9, 7 -> 4         node  token  parent  sources
             lookup: 7 -> 3 -> 5 -> 6            0     7      -1      -
                                                 1     3      0       medusa|lookup
                                                 2     9      1       medusa
                                                 3     4      0       medusa
                                                 4     5      1       lookup
                                                 5     6      4       lookup
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgert.medusa.tree_buffers import TreeBuffers, tree_from_parents

DRAFTERS = ("medusa", "lookup", "draft")  # bit i of ``sources`` is DRAFTERS[i]


def source_bit(drafter: str) -> int:
    return 1 << DRAFTERS.index(drafter)


@dataclass(frozen=True)
class TokenTree:
    buffers: TreeBuffers  # parents, depths, ancestor mask, retrieve paths
    tokens: np.ndarray  # [N+1] int64, tokens[0] the root
    sources: np.ndarray  # [N+1] int64 bitmask of the drafters that proposed each node

    @property
    def size(self) -> int:
        return len(self.tokens)

    def proposed_by(self, nodes: np.ndarray) -> dict[str, int]:
        """How many of ``nodes`` each drafter proposed (a node two drafters share counts for
        both)."""
        bits = self.sources[np.asarray(nodes, dtype=np.int64)]
        return {name: int(np.count_nonzero(bits & (1 << i))) for i, name in enumerate(DRAFTERS)}


class TokenTreeBuilder:
    """Merges drafted trees under one root into a :class:`TokenTree`."""

    def __init__(self, root: int) -> None:
        self.tokens = [int(root)]
        self.parents = [-1]
        self.sources = [0]
        self.children: list[dict[int, int]] = [{}]

    @property
    def size(self) -> int:
        return len(self.tokens)

    def add(self, drafter: str, parents, tokens) -> None:
        """Add a drafted tree: ``parents``/``tokens`` [M+1], node 0 its root (this tree's
        root, whatever its token), every parent before its children. A chain of k tokens is
        ``parents = [-1, 0, 1, ..., k-1]``."""
        bit = source_bit(drafter)
        placed = [0]  # drafted node -> trie node
        for node in range(1, len(parents)):
            at, token = placed[int(parents[node])], int(tokens[node])
            child = self.children[at].get(token)
            if child is None:
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(at)
                self.sources.append(0)
                self.children.append({})
                self.children[at][token] = child
            self.sources[child] |= bit
            placed.append(child)

    def add_chain(self, drafter: str, tokens) -> None:
        """A chain of drafted tokens after the root."""
        chain = [int(t) for t in tokens]
        self.add(drafter, [-1] + list(range(len(chain))), [self.tokens[0]] + chain)

    def build(self) -> TokenTree:
        return TokenTree(tree_from_parents(np.array(self.parents, dtype=np.int64)),
                         np.array(self.tokens, dtype=np.int64),
                         np.array(self.sources, dtype=np.int64))
