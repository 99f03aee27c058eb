"""Phase functions of the decode loop (gpt-fast style): each one forward over the fixed cache."""

from __future__ import annotations

import numpy as np

from edgert.runtime.backends import Backend, StepInputs, StepOutputs
from edgert.runtime.kv_cache import KVCacheBase

MASK_VALUE = np.float32(-1e9)


def causal_mask(q: int) -> np.ndarray:
    """[1,1,q,q] additive mask: token i sees new tokens 0..i."""
    return np.triu(np.full((q, q), MASK_VALUE, dtype=np.float32), k=1)[None, None]


def forward_block(backend: Backend, cache: KVCacheBase, ids, logits_rows: str = "last"
                  ) -> StepOutputs:
    """One causal forward of ``ids`` at the end of the cache, not committed: their K/V are
    written at [length, length + q) and the cache length stays. ``logits_rows``: "last" (the
    last token's logits/hidden, [1,V]) or "all" ([q,V])."""
    piece = np.asarray(ids, dtype=np.int64).reshape(1, -1)  # [1,q]
    q = piece.shape[1]
    cache.check_room(q)
    pos = np.arange(cache.length, cache.length + q, dtype=np.int64)[None]
    rows = np.array([q - 1], dtype=np.int64) if logits_rows == "last" else np.arange(q)
    return backend.forward(StepInputs(piece, pos, causal_mask(q), rows, cache.length,
                                      np.arange(-1, q - 1, dtype=np.int64)))


def prefill(backend: Backend, cache: KVCacheBase, ids: list[int], chunk: int) -> StepOutputs:
    """Run the prompt through the model in chunks of at most ``chunk`` tokens.

    Returns the logits/hidden state of the last prompt token ([1,V], [1,H]), and every prompt
    token's features [len(ids), H] where the graph returns them.
    """
    cache.check_room(len(ids))
    out, features = None, []
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        out = forward_block(backend, cache, piece)
        cache.advance(len(piece))
        if out.features is not None:
            features.append(out.features)
    if len(features) > 1:
        out = StepOutputs(out.logits, out.hidden, np.concatenate(features))
    return out


def prefill_sparse(backend: Backend, cache: KVCacheBase, ids: list[int],
                   fixed_chunk: int = 0) -> StepOutputs:
    """DHSA prefill into an empty cache: ONNX Runtime runs the sparse graph in calls of
    ``prefill_chunk`` tokens, TVM's ``prefill_dhsa`` the whole prompt in one call."""
    cache.check_room(len(ids))
    out = backend.prefill_sparse(np.asarray(ids, dtype=np.int64)[None], fixed_chunk)
    cache.advance(len(ids))
    return out


_ONE_MASK = np.zeros((1, 1, 1, 1), dtype=np.float32)
_LAST = np.zeros((1,), dtype=np.int64)
_ROOT = np.full((1,), -1, dtype=np.int64)
_PAIR_MASK = causal_mask(2)
_PAIR_PARENTS = np.array([-1, 0], dtype=np.int64)


def decode_one(backend: Backend, cache: KVCacheBase, token: int, rows: int = 1
               ) -> StepOutputs:
    """One new token at position ``cache.length``: [1,V] logits, [1,H] hidden.

    ``rows=2`` runs the token as the first row of a two-row causal block (the second row a
    copy, uncommitted: the next step overwrites its entry): the step then goes through the
    same multi-row kernels as a tree verification. ONNX Runtime's GroupQueryAttention
    computes one row differently from several (in the last bits), which int8 activations
    turn into logits ~0.5 apart, so a speculative step's greedy choice could differ from a
    one-row plain step's; decoding every token through multi-row attention keeps all modes
    token-for-token identical. Artifacts whose graph pads a lone row's attention itself
    (``min_attention_rows``, edgert.export.row_padding) decode one row. The last free slot of
    the cache falls back to one row."""
    if rows == 2 and cache.length + 2 <= cache.capacity:
        step = StepInputs(np.array([[token, token]], dtype=np.int64),
                          np.array([[cache.length, cache.length + 1]], dtype=np.int64),
                          _PAIR_MASK, _LAST, cache.length, _PAIR_PARENTS)
    else:
        cache.check_room(1)
        step = StepInputs(np.array([[token]], dtype=np.int64),
                          np.array([[cache.length]], dtype=np.int64), _ONE_MASK, _LAST,
                          cache.length, _ROOT)
    out = backend.forward(step)
    cache.advance(1)
    return out
