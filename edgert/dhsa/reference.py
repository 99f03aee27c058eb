"""NumPy reference of DHSA prefill attention (causal, GQA).

    q [Hq,T,D], k/v [Hkv,T,D] (rotary applied). The prompt is processed in calls
    (``prefill_calls``: query chunks of ``prefill_chunk`` tokens; 0 = one call): a call
    covering [s, e) sees only tokens < e, as a chunked prefill against the cache does.
    1. boundaries (training-free, shared by all layers; computed at ``boundary_layer``):
       probe queries R = every probe_stride-th token + the last dense_tail tokens;
       A = causal softmax(q k^T / sqrt(D)) over R, averaged over heads  [|R|, T];
       for candidate c (boundary between c and c+1), over probes r >= c + w:
           past = sum A[r, c-w+1 .. c],  future = sum A[r, c+1 .. c+w]
           ratio = (max + eps) / (min + eps)      (valid for 2w-1 <= c < T-2w)
       boundaries = ratio >= threshold and a local maximum within +-nms_radius,
       plus one before the dense tail; (fixed_chunk > 0: every fixed_chunk tokens instead)
       per call [s, e): probes in [s, e) decide the boundaries after c in [s-1, e-1)
       (valid also needs c < e - 2w); earlier boundaries are kept as they were
    2. chunks: key chunk j = [s_j, s_{j+1}) cut at e;  vec_j = mean(k_bar[chunk]) * sqrt(len)
       query block b (block_size tokens): vec_b = mean(q_bar[block]) * sqrt(len)
       selecting heads: per_kv_head = 0, one (q_bar, k_bar averaged over all heads);
       per_kv_head = 1, one per KV head (k_bar = its keys, q_bar = its query heads averaged)
    3. per selecting head: token score[b, t] = vec_b . vec_{chunk(t)}; allowed: t < end of
       block b (causal);
       the first ``sink`` and the last ``local`` allowed tokens are forced in;
       selected = top ``budget`` (stable: lower index first on ties)
    4. each query p of block b attends to its selected keys (its KV head's) with index <= p;
       the last dense_tail queries attend to every key <= p (dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgert.dhsa.params import BOUNDARY_EPS as EPS
from edgert.dhsa.params import DHSAParams, prefill_calls

NEG = np.float32(-np.inf)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _repeat_kv(x: np.ndarray, group: int) -> np.ndarray:
    return np.repeat(x, group, axis=0)


def probe_rows(seq_len: int, params: DHSAParams) -> np.ndarray:
    strided = np.arange(params.probe_stride - 1, seq_len, params.probe_stride)
    tail = np.arange(max(0, seq_len - max(params.dense_tail, 1)), seq_len)
    return np.unique(np.concatenate([strided, tail]))


def boundary_ratios(q: np.ndarray, k: np.ndarray, params: DHSAParams, start: int = 0,
                    prompt_len: int | None = None) -> np.ndarray:
    """ratio[c] for a boundary between c and c+1 (0 where not a valid candidate), for the call
    that covers [start, E): q/k are the tokens [0, E) (E = q.shape[1]); the probes are the
    prompt's probe rows in [start, E) and the candidates c in [start - 1, E - 1)."""
    hq, seq_len, d = q.shape
    w = params.boundary_window
    rows = probe_rows(prompt_len or seq_len, params)
    rows = rows[(rows >= start) & (rows < seq_len)]
    keys = _repeat_kv(k, hq // k.shape[0])
    scores = np.einsum("hrd,htd->hrt", q[:, rows], keys) / np.sqrt(d)
    scores = np.where(np.arange(seq_len)[None, None, :] <= rows[None, :, None], scores, NEG)
    attn = _softmax(scores.astype(np.float32)).mean(axis=0)  # [R,T]
    csum = np.concatenate([np.zeros((len(rows), 1), np.float32), np.cumsum(attn, axis=1)], 1)
    c = np.arange(seq_len)
    lo, mid, hi = np.clip(c - w + 1, 0, seq_len), c + 1, np.clip(c + w + 1, 0, seq_len)
    past_rows = csum[:, mid.clip(max=seq_len)] - csum[:, lo]  # [R,T]
    future_rows = csum[:, hi] - csum[:, mid.clip(max=seq_len)]
    probe_ok = rows[:, None] >= (c + w)[None, :]
    past = (past_rows * probe_ok).sum(0)
    future = (future_rows * probe_ok).sum(0)
    ratio = (np.maximum(past, future) + EPS) / (np.minimum(past, future) + EPS)
    valid = (c >= 2 * w - 1) & (c < seq_len - 2 * w) & (c >= start - 1)
    return np.where(valid, ratio, 0.0).astype(np.float32)


def chunk_starts(ratio: np.ndarray, params: DHSAParams, prompt_len: int | None = None
                 ) -> np.ndarray:
    """Boolean [E]: token t starts a chunk. Token 0 always does; so does the dense tail of a
    prompt of ``prompt_len`` (default E) tokens."""
    seq_len = len(ratio)
    prompt_len = prompt_len or seq_len
    starts = np.zeros(seq_len, dtype=bool)
    starts[0] = True
    if params.fixed_chunk:
        starts[::params.fixed_chunk] = True
        return starts
    r = params.nms_radius
    padded = np.pad(ratio, r, constant_values=-np.inf)
    window_max = np.lib.stride_tricks.sliding_window_view(padded, 2 * r + 1).max(axis=1)
    peaks = (ratio >= params.boundary_threshold) & (ratio >= window_max)
    starts[1:] |= peaks[:-1]  # boundary after c: chunk starts at c + 1
    tail_start = prompt_len - params.dense_tail
    if params.dense_tail and 0 < tail_start < seq_len:
        starts[tail_start] = True  # the instruction is a chunk of its own
    return starts


def causal_chunk_starts(q: np.ndarray, k: np.ndarray, params: DHSAParams) -> np.ndarray:
    """Chunk starts [T] of a whole prompt, call by call (each call decides its own tokens)."""
    seq_len = q.shape[1]
    starts = np.zeros(seq_len, dtype=bool)
    for start, end in prefill_calls(seq_len, params):
        ratio = boundary_ratios(q[:, :end], k[:, :end], params, start, seq_len)
        starts[start:end] = chunk_starts(ratio, params, seq_len)[start:]
    return starts


def selecting_heads(q: np.ndarray, k: np.ndarray, params: DHSAParams
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(q_bar [S,T,D], k_bar [S,T,D]) of the heads that select keys: S = Hkv per KV head,
    else S = 1 (all heads averaged)."""
    hkv = k.shape[0]
    if params.per_kv_head:
        return q.reshape(hkv, q.shape[0] // hkv, *q.shape[1:]).mean(axis=1), k
    return q.mean(axis=0, keepdims=True), k.mean(axis=0, keepdims=True)


def token_scores(q: np.ndarray, k: np.ndarray, starts: np.ndarray, params: DHSAParams,
                 start: int = 0) -> np.ndarray:
    """[S, nb, E] score of every key token for every query block of the call [start, E) (its
    chunk's score), per selecting head; q/k/starts: the tokens [0, E)."""
    q_bar, k_bar = selecting_heads(q[:, start:], k, params)
    if params.center_keys:  # a shift common to all keys: no attention weight changes
        k_bar = k_bar - k_bar.mean(axis=1, keepdims=True)
    heads, q_len, d = q_bar.shape
    ids = np.cumsum(starts) - 1  # chunk id per token
    n_chunks = ids[-1] + 1
    sums = np.zeros((heads, n_chunks, d), np.float32)
    np.add.at(sums, (slice(None), ids), k_bar)
    lengths = np.bincount(ids, minlength=n_chunks).astype(np.float32)
    chunk_vec = sums / np.sqrt(lengths)[None, :, None]  # mean * sqrt(len)
    bs = params.block_size
    nb = -(-q_len // bs)
    padded = np.zeros((heads, nb * bs, d), np.float32)
    padded[:, :q_len] = q_bar
    block_len = np.minimum(bs, q_len - np.arange(nb) * bs).astype(np.float32)
    block_vec = padded.reshape(heads, nb, bs, d).sum(axis=2) / np.sqrt(block_len)[None, :, None]
    return (block_vec @ chunk_vec.transpose(0, 2, 1))[:, :, ids]  # upsampled to tokens


@dataclass
class Selection:
    index: np.ndarray  # [S, nb, budget] key positions per selecting head and query block
    valid: np.ndarray  # [S, nb, budget] bool: a real, causally allowed key

    def keys(self, block: int, head: int = 0) -> np.ndarray:
        """The selected (valid) key positions of query block ``block``, selecting head
        ``head``."""
        return self.index[head, block][self.valid[head, block]]


def select_keys(scores: np.ndarray, seq_len: int, params: DHSAParams,
                start: int = 0) -> Selection:
    """The keys of each query block of the call [start, seq_len) (``start`` a multiple of the
    block size)."""
    nb = scores.shape[1]
    t = np.arange(seq_len)[None, :]
    block_end = np.minimum((np.arange(nb)[:, None] + 1) * params.block_size + start, seq_len)
    allowed = t < block_end
    forced = allowed & ((t < params.sink) | (t >= block_end - params.local))
    ranked = np.where(forced, np.inf, np.where(allowed, scores, NEG)).astype(np.float32)
    budget = min(params.budget, seq_len)
    order = np.argsort(-ranked, axis=-1, kind="stable")[..., :budget]
    valid = np.take_along_axis(ranked, order, axis=-1) > NEG
    short = params.budget - budget  # fewer keys than the budget: pad with invalid slots
    pad = [(0, 0), (0, 0), (0, short)]
    return Selection(np.pad(order, pad), np.pad(valid, pad, constant_values=False))


def sparse_attention(q, k, v, sel: Selection, params: DHSAParams, start: int = 0,
                     prompt_len: int | None = None) -> np.ndarray:
    """Rows [start, E) of the attention output (q/k/v: the tokens [0, E)); the rows of the
    prompt's dense tail attend densely."""
    hq, seq_len, d = q.shape
    group = hq // k.shape[0]
    keys, values = _repeat_kv(k, group), _repeat_kv(v, group)
    out = np.zeros_like(q)
    bs = params.block_size
    head_of = np.arange(hq) // group if sel.index.shape[0] > 1 else np.zeros(hq, int)
    for b in range(sel.index.shape[1]):
        qs = np.arange(start + b * bs, min(start + (b + 1) * bs, seq_len))
        idx = sel.index[head_of, b]  # [Hq,budget]: each query head its selecting head's keys
        picked = np.arange(hq)[:, None]
        s = np.einsum("hqd,hkd->hqk", q[:, qs], keys[picked, idx]) / np.sqrt(d)
        ok = sel.valid[head_of, b][:, None, :] & (idx[:, None, :] <= qs[None, :, None])
        p = _softmax(np.where(ok, s, NEG))
        out[:, qs] = np.einsum("hqk,hkd->hqd", p, values[picked, idx])
    tail = params.dense_tail
    if tail:
        qs = np.arange(max(start, (prompt_len or seq_len) - tail), seq_len)
        s = np.einsum("hqd,htd->hqt", q[:, qs], keys) / np.sqrt(d)
        s = np.where(np.arange(seq_len)[None, None, :] <= qs[None, :, None], s, NEG)
        out[:, qs] = np.einsum("hqt,htd->hqd", _softmax(s), values)
    return out[:, start:]


def dense_attention(q, k, v) -> np.ndarray:
    hq, seq_len, d = q.shape
    group = hq // k.shape[0]
    s = np.einsum("hqd,htd->hqt", q, _repeat_kv(k, group)) / np.sqrt(d)
    causal = np.tril(np.ones((seq_len, seq_len), bool))
    return np.einsum("hqt,htd->hqd", _softmax(np.where(causal, s, NEG)), _repeat_kv(v, group))


def dhsa_attention(q, k, v, params: DHSAParams, starts: np.ndarray | None = None):
    """DHSA over a whole prompt, call by call (``prefill_calls``); ``starts`` (chunk starts)
    computed from this q/k if not given. Returns (out [Hq,T,D], starts, selection of every
    query block)."""
    seq_len = q.shape[1]
    if starts is None:
        starts = causal_chunk_starts(q, k, params)
    out = np.zeros_like(q)
    selections = []
    for start, end in prefill_calls(seq_len, params):
        scores = token_scores(q[:, :end], k[:, :end], starts[:end], params, start)
        sel = select_keys(scores, end, params, start)
        out[:, start:end] = sparse_attention(q[:, :end], k[:, :end], v[:, :end], sel, params,
                                             start, seq_len)
        selections.append(sel)
    return out, starts, Selection(np.concatenate([s.index for s in selections], axis=1),
                                  np.concatenate([s.valid for s in selections], axis=1))
