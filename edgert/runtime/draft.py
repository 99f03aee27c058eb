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

from edgert.runtime.steps import causal_mask

CATCH_UP_CHUNK = 512  # rows per draft call when catching up (a long prompt)


class DraftState:
    """One generation's drafting over ``backend``'s draft session and cache."""

    def __init__(self, backend, depth: int) -> None:
        self.backend = backend
        self.cache = backend.draft_cache
        self.depth = depth
        self._tokens: list[int] = []  # pending rows: x_p ...
        self._features: list[np.ndarray] = []  # ... and h_{p-1}, [m, H] blocks

    def start(self, prompt_ids: list[int], first_token: int, features: np.ndarray,
              keep: int = 0) -> None:
        """After prefill: ``first_token`` is the token the backbone chose after the prompt,
        ``features`` [P - keep, H] its features at positions keep..P-1 (those it computed);
        the draft cache keeps its first ``keep`` rows (a reused prefix's)."""
        self.cache.truncate(keep)
        self._tokens = [*prompt_ids[keep + 1:], first_token]
        self._features = [np.asarray(features, dtype=np.float32)]
        if len(self._features[0]) != len(self._tokens):
            raise ValueError(f"{len(self._tokens)} draft rows but features of "
                             f"{len(self._features[0])} positions")

    def accept(self, tokens: list[int], features: np.ndarray) -> None:
        """The backbone committed ``tokens[:-1]`` and chose ``tokens[-1]`` after them;
        ``features`` [len(tokens), H]: its features at the positions before each."""
        self._tokens += list(tokens)
        self._features.append(np.asarray(features, dtype=np.float32))

    def propose(self) -> list[int]:
        """Catch up on the pending rows, then draft up to ``depth`` tokens after the root;
        [] when the draft cache has no room for them."""
        pending = len(self._tokens)
        if not pending or self.cache.length + pending + self.depth > self.cache.capacity:
            return []
        features = np.concatenate(self._features) if len(self._features) > 1 else \
            self._features[0]
        tokens = np.asarray(self._tokens, dtype=np.int64)
        position = self.cache.length + 1  # the first pending row's p
        for start in range(0, pending, CATCH_UP_CHUNK):
            end = min(pending, start + CATCH_UP_CHUNK)
            ids, hidden = self._call(tokens[start:end], features[start:end],
                                     position + start)
            self.cache.advance(end - start)
        self._tokens, self._features = [], []
        chain = [int(ids[0])]
        written = 0
        while len(chain) < self.depth:
            # an uncommitted row at [length + written]: the next catch-up overwrites it
            ids, hidden = self._call(np.array([chain[-1]], dtype=np.int64), hidden,
                                     self.cache.length + 1 + written, past=written)
            written += 1
            chain.append(int(ids[0]))
        return chain

    def _call(self, tokens: np.ndarray, features: np.ndarray, position: int, past: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
        """One draft call over rows at positions ``position``..; ``past`` uncommitted entries
        (this step's drafts) precede them. Returns the last row's top-k ids and feature."""
        q = len(tokens)
        ids, _, hidden = self.backend.draft_forward(
            tokens[None], features[None], np.arange(position, position + q, dtype=np.int64)[None],
            causal_mask(q), np.array([q - 1], dtype=np.int64), self.cache.length + past)
        return ids[0, 0], hidden[0]
