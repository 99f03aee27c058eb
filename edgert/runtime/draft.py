"""The draft layer at run time: its own KV cache kept in step with the backbone's, and chains
of drafted tokens.

A draft row at position p reads token x_p and feature h_{p-1}. Rows whose feature is the
backbone's (prompt positions, accepted tokens) are committed to the draft cache; drafting then
runs on the draft's own features::

    pending rows (x_p, h_{p-1}) for the positions the backbone committed since the last step,
    the root (the token the backbone chose) last
        ─ one draft call (committed) ─> d1 = top-1 after the root, f
    (f, d1) ─ one-row call ─> d2, f'  ... up to ``depth`` tokens (written past the committed
        entries, uncommitted: the next catch-up overwrites them)

After verification, :meth:`DraftState.accept` queues the accepted tokens (and the token the
backbone chose after them) with the backbone's features of the verified rows they follow.
"""

from __future__ import annotations

import numpy as np

from edgert.runtime.steps import MASK_VALUE, causal_mask
from edgert.speculative.dynamic_tree import DraftTree, DraftTreeParams

CATCH_UP_CHUNK = 512  # rows per draft call when catching up (a long prompt)


class DraftState:
    """One generation's drafting over ``backend``'s draft session and cache."""

    def __init__(self, backend, depth: int) -> None:
        self.backend = backend
        self.cache = backend.draft_cache
        self.depth = depth
        self._mask_buffer = np.empty(0, dtype=np.float32)  # dynamic trees' masks
        self.last_tree: DraftTree | None = None  # the last dynamic tree grown, all its nodes
        self._tokens: list[int] = []  # pending rows: x_p ...
        self._features: list[np.ndarray] = []  # ... and h_{p-1}, [m, H] blocks

    def start(self, prompt_ids: list[int], first_token: int, features: np.ndarray,
              keep: int = 0) -> None:
        """After prefill: ``first_token`` is the token the backbone chose after the prompt,
        ``features`` [P - keep, H] its features at positions keep..P-1 (those it computed);
        the draft cache keeps its first ``keep`` rows (a reused prefix's)."""
        self.cache.truncate(keep)
        self._tokens = [*prompt_ids[keep + 1:], first_token]
        self._root_token = first_token
        self._features = [np.asarray(features, dtype=np.float32)]
        if len(self._features[0]) != len(self._tokens):
            raise ValueError(f"{len(self._tokens)} draft rows but features of "
                             f"{len(self._features[0])} positions")

    def accept(self, tokens: list[int], features: np.ndarray) -> None:
        """The backbone committed ``tokens[:-1]`` and chose ``tokens[-1]`` after them;
        ``features`` [len(tokens), H]: its features at the positions before each."""
        self._tokens += list(tokens)
        self._features.append(np.asarray(features, dtype=np.float32))
        self._root_token = int(tokens[-1])

    def _catch_up(self, room: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Commit the pending rows to the draft cache; the root row's (top-k ids, their
        log-probabilities, feature [1,H]), or None without ``room`` entries to draft into."""
        pending = len(self._tokens)
        if not pending or self.cache.length + pending + room > self.cache.capacity:
            return None
        features = np.concatenate(self._features) if len(self._features) > 1 else \
            self._features[0]
        tokens = np.asarray(self._tokens, dtype=np.int64)
        position = self.cache.length + 1  # the first pending row's p
        for start in range(0, pending, CATCH_UP_CHUNK):
            end = min(pending, start + CATCH_UP_CHUNK)
            q = end - start
            ids, logprobs, hidden = self.backend.draft_forward(
                tokens[None, start:end], features[None, start:end],
                np.arange(position + start, position + end, dtype=np.int64)[None],
                causal_mask(q), np.array([q - 1], dtype=np.int64), self.cache.length)
            self.cache.advance(q)
        self._tokens, self._features = [], []
        return ids[0, 0], logprobs[0, 0], hidden[0]

    def propose(self) -> list[int]:
        """Catch up on the pending rows, then draft a chain of up to ``depth`` tokens after
        the root (each the draft's top-1 after the ones before it); [] when the draft cache
        has no room for them."""
        root = self._catch_up(self.depth)
        if root is None:
            return []
        ids, _, hidden = root
        chain = [int(ids[0])]
        written = 0
        while len(chain) < self.depth:
            # an uncommitted row at [length + written]: the next catch-up overwrites it
            ids, hidden = self._call(np.array([chain[-1]], dtype=np.int64), hidden,
                                     self.cache.length + 1 + written, past=written)
            written += 1
            chain.append(int(ids[0]))
        return chain

    def propose_tree(self, params: DraftTreeParams) -> tuple[np.ndarray, np.ndarray] | None:
        """Catch up, then grow a dynamic tree (``edgert.speculative.dynamic_tree``): each
        depth, one draft call over the ``beam`` best nodes of the depth before, every row
        attending to the committed rows and its own ancestors (a mask over the rows drafted
        this step, the committed ones all visible); returns
        the ``budget`` best nodes as (parents, tokens), node 0 the root; None without room."""
        rows = params.beam * (params.depth - 1)
        root = self._catch_up(rows + 1)
        if root is None:
            return None
        ids, logprobs, feature = root
        committed = self.cache.length
        tree = DraftTree.rooted(self._root_token)
        frontier = tree.add_children(0, ids[:params.topk], logprobs[:params.topk])
        feature_of = {0: feature[0]}  # node -> the feature its row produced
        entry_of: dict[int, int] = {}  # node -> its draft-cache entry past the committed ones
        written = 0
        for _ in range(params.depth - 1):
            expand = tree.best(frontier, params.beam)
            q = len(expand)
            # over this step's rows only (every committed entry visible): q x (written + q),
            # not q x the context
            mask = self._mask(q, written + q)
            mask[...] = MASK_VALUE
            for r, node in enumerate(expand):
                entry_of[node] = written + r  # column: the entry past the committed ones
                for ancestor in tree.ancestors(node):
                    mask[0, 0, r, entry_of[ancestor]] = 0.0
            position = committed + 1  # the root row's position is ``committed``
            out_ids, out_logprobs, out_features = self.backend.draft_forward(
                np.array([[tree.tokens[n] for n in expand]], dtype=np.int64),
                np.stack([feature_of[tree.parents[n]] for n in expand])[None],
                np.array([[position - 1 + tree.depths[n] for n in expand]], dtype=np.int64),
                mask, np.arange(q, dtype=np.int64), committed + written)
            written += q
            frontier = []
            for r, node in enumerate(expand):
                feature_of[node] = out_features[0, r]
                frontier += tree.add_children(node, out_ids[0, r, :params.topk],
                                              out_logprobs[0, r, :params.topk])
        self.last_tree = tree  # (tune-tree selects several budgets from one growth)
        return tree.select(params.budget)

    def _mask(self, q: int, width: int) -> np.ndarray:
        """A [1,1,q,width] view of one buffer, grown only for a larger tree (no allocation per
        draft call)."""
        if self._mask_buffer.size < q * width:
            self._mask_buffer = np.empty(q * width, dtype=np.float32)
        return self._mask_buffer[:q * width].reshape(1, 1, q, width)

    def _call(self, tokens: np.ndarray, features: np.ndarray, position: int, past: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
        """One draft call over rows at positions ``position``..; ``past`` uncommitted entries
        (this step's drafts) precede them. Returns the last row's top-k ids and feature."""
        q = len(tokens)
        ids, _, hidden = self.backend.draft_forward(
            tokens[None], features[None], np.arange(position, position + q, dtype=np.int64)[None],
            causal_mask(q), np.array([q - 1], dtype=np.int64), self.cache.length + past)
        return ids[0, 0], hidden[0]
