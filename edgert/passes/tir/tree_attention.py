"""Tree-verification attention over a fixed-capacity KV cache, read in place.

The n new tokens (a prompt chunk, one decode token, or a Medusa tree) attend to the whole
cached prefix [0, past) and to their tree ancestors (and themselves) among the new tokens. The
tree is not a dense mask but a compact per-node interval in DFS pre-order:

    order[i] = (pre_i, pre_i + subtree_size_i)
    new token j is an ancestor-or-self of new token i  <=>  pre_j <= pre_i < pre_j + size_j

A causal chunk is the chain 0 -> 1 -> ... -> n-1: order[i] = (i, n).

    q        [n, Hq, D]          (rotary applied)
    k_cache  [Hkv, C, D]         layer cache, the new entries already at [past, past + n)
    v_cache  [Hkv, C, D]
    order    [n, 2] int32
    out      [n, Hq, D]

The intervals come from ``edgert.medusa.tree_order`` (the runtime builds them per step).

The same kernel with ``mask="visibility"`` (``edgert_masked_attention``, the draft layer's)
reads a dense visibility row per new token instead of the intervals::

    visibility [n, w] float32   0: the key is visible, the mask value (-1e9; anything below
                                VISIBLE_ABOVE = -1e4): it is not; column c is
                                key past + n - w + c, the keys before it visible (w = n: over
                                the new tokens; w > n: over the rows a dynamic draft tree
                                drafted earlier in the step too: a row sees the committed
                                entries and its ancestors among those rows, not its cousins)

It is the ONNX graphs' additive mask read as a visibility: their masks only ever hold 0 and
the mask value.

``kv_append`` writes the new K or V entries into the cache in place (only those n entries).
Both kernels come as one TIR template with two loop mappings: GPU (blocks x threads) and CPU
(serial x parallel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgert.passes.tir.common import MASKED, flat_axes, loop_mapping, softmax_state, vector_loop

MASKS = ("tree", "visibility")  # how the new tokens' visible keys reach the kernel
# a visibility entry above this: the key is visible (an additive bias below it weighs
# exp(-1e4) = 0 in float32 anyway: reading it as a visibility changes nothing)
VISIBLE_ABOVE = -1e4


def tree_attention_reference(q, k_cache, v_cache, order, past: int,
                             softcap: float = 0.0) -> np.ndarray:
    """NumPy reference: q [n,Hq,D], caches [Hkv,C,D] (new entries at [past, past+n));
    ``softcap`` c > 0: scores -> c*tanh(scores/c) before the mask (Gemma 2)."""
    n = q.shape[0]
    pre, end = order[:, 0], order[:, 1]
    tree_ok = (pre[None, :] <= pre[:, None]) & (pre[:, None] < end[None, :])  # [i, j]
    ok = np.concatenate([np.ones((n, past), bool), tree_ok], axis=1)
    return _reference(q, k_cache, v_cache, ok, softcap)


def masked_attention_reference(q, k_cache, v_cache, visibility, past: int) -> np.ndarray:
    """NumPy reference of ``mask="visibility"``: ``visibility`` [n, w] additive (0 or the
    mask value) over the last w of the past + n keys."""
    n, w = visibility.shape
    ok = np.concatenate([np.ones((n, past + n - w), bool), visibility > VISIBLE_ABOVE], axis=1)
    return _reference(q, k_cache, v_cache, ok, 0.0)


def _reference(q, k_cache, v_cache, ok, softcap: float) -> np.ndarray:
    """Attention of q [n,Hq,D] over the first T = ok.shape[1] cache entries, ``ok`` [n, T]."""
    n, hq, d = q.shape
    group = hq // k_cache.shape[0]
    total = ok.shape[1]
    keys = np.repeat(k_cache[:, :total], group, axis=0)  # [Hq,T,D]
    values = np.repeat(v_cache[:, :total], group, axis=0)
    scores = np.einsum("ihd,htd->hit", q, keys) / math.sqrt(d)
    if softcap:
        scores = np.tanh(scores / softcap) * softcap
    scores = np.where(ok[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hit,htd->ihd", probs, values)


@dataclass(frozen=True)
class TreeAttentionKnobs:
    """Schedule parameters of the tree-attention kernel (searched by ``edgert tune``).

    heads_per_task: query heads of one KV group one task handles together, so each cached
        key/value row is loaded once for all of them (1 .. group size, dividing it).
    key_tile: keys scored together before one online-softmax rescale of the accumulator.
    lanes: vector lanes of the dot products (1: scalar; must divide head_dim).
    """

    heads_per_task: int = 1
    key_tile: int = 1
    lanes: int = 1

    def check(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        group = num_heads // num_kv_heads
        if group % self.heads_per_task or head_dim % self.lanes or self.key_tile < 1:
            raise ValueError(f"tree-attention knobs {self} do not fit heads {num_heads}/"
                             f"{num_kv_heads}, head_dim {head_dim}")


DEFAULT_KNOBS = TreeAttentionKnobs()


# bumped when the kernel's code changes what its knobs mean: records of an older version are
# not applied (v2: the CPU mapping's SIMD ``lanes`` knob took effect; v1 ignored it)
KERNEL_VERSION = 2


def tree_attention_workload(num_heads: int, num_kv_heads: int, head_dim: int) -> str:
    """The tuning-database name of the kernel for this attention shape (and version)."""
    return f"tree_attention_v{KERNEL_VERSION}_{num_heads}_{num_kv_heads}_{head_dim}"


def tree_attention_search_space(num_heads: int, num_kv_heads: int,
                                head_dim: int) -> list[TreeAttentionKnobs]:
    group = num_heads // num_kv_heads
    space = []
    for hpt in sorted({1, group} | {g for g in (2, 4) if group % g == 0}):
        for tile in (1, 8, 32):
            for lanes in (1, 8, 16):
                if head_dim % lanes == 0:
                    space.append(TreeAttentionKnobs(hpt, tile, lanes))
    return space


def tree_attention_tir(num_heads: int, num_kv_heads: int, head_dim: int, gpu: bool = False,
                       knobs: TreeAttentionKnobs = DEFAULT_KNOBS, softcap: float = 0.0,
                       mask: str = "tree"):
    """The kernel as TIR (``mask``: "tree" intervals, or a dense "visibility" row per token,
    the module docstring's two forms; global symbols ``edgert_tree_attention`` and
    ``edgert_masked_attention``). One task per (query, ``heads_per_task`` heads of a KV group) (GPU:
    blocks x threads; CPU: parallel tasks); keys in tiles of ``key_tile``: the tile's scores,
    then one rescale of the running max/sum/accumulator (online softmax), so no score matrix
    is materialised. Marked scheduled: dlight's generic rules cannot schedule fused
    attention; ``knobs`` are the schedule. ``softcap`` c > 0 soft-limits each score to
    c*tanh(score/c) (Gemma 2)."""
    from tvm import tirx
    from tvm.script import tirx as T

    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    knobs.check(num_heads, num_kv_heads, head_dim)
    hq, hkv, d = num_heads, num_kv_heads, head_dim
    group = hq // hkv
    hpt, tile, lanes = knobs.heads_per_task, knobs.key_tile, knobs.lanes
    tasks = hq // hpt
    scale = 1.0 / math.sqrt(d)
    outer, inner = loop_mapping(gpu)
    threads = tasks if gpu else 1  # of the flat loop's blocks (not the SIMD ``lanes``)
    # CPU: SIMD over head_dim / lanes; GPU: serial per thread (no float32x16 in CUDA C)
    simd = vector_loop(gpu)
    init_state, store_state = softmax_state(hpt, d)

    def key(jt, t):  # the key index of slot t of tile jt (an expression: no int64 local)
        return jt * tile + t

    def capped(score):
        if not softcap:
            return score
        return T.tanh(score * T.float32(1.0 / softcap)) * T.float32(softcap)

    def node(j, past, n):
        # TIR's `and`/`or` do not short-circuit: the clamped index keeps the tree lookup in
        # bounds for cached keys (j < past) and the padding of the last tile
        return T.max(T.min(j - past, n - 1), T.int64(0))

    def mask_shape(n):
        if mask == "tree":
            return (n, 2), "int32"
        return (n, tirx.Var("w", "int64")), "float32"

    def visible(masks, i, j, past, n):
        """Whether key j (< past + n) is visible to new token i."""
        if mask == "tree":
            return T.Or(j < past, T.And(masks[node(j, past, n), 0] <= masks[i, 0],
                                        masks[i, 0] < masks[node(j, past, n), 1]))
        w = masks.shape[1]
        first = past + n - w  # the key of column 0
        return T.Or(j < first, masks[i, T.max(j - first, T.int64(0))] > T.float32(VISIBLE_ABOVE))

    @T.prim_func(private=True, s_tir=True)
    def tree_attention(var_q: T.handle, var_kc: T.handle, var_vc: T.handle,
                       var_mask: T.handle, past: T.int64, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        cap = T.int64()
        q = T.match_buffer(var_q, (n, hq, d), "float32")
        kc = T.match_buffer(var_kc, (hkv, cap, d), "float32")
        vc = T.match_buffer(var_vc, (hkv, cap, d), "float32")
        masks = T.match_buffer(var_mask, *mask_shape(n))
        out = T.match_buffer(var_out, (n, hq, d), "float32")
        # one flat loop over (query, task): GPU blocks of ``threads`` threads; CPU one parallel
        # loop (one thread-pool launch per call, not one per query)
        for b in outer(T.ceildiv(n * tasks, threads)):
            for th in inner(threads):
                with T.sblock("attention"):
                    i, task = flat_axes(b * threads + th, n, tasks)
                    T.reads(q[i, task * hpt:task * hpt + hpt, 0:d],
                            kc[task * hpt // group, 0:cap, 0:d],
                            vc[task * hpt // group, 0:cap, 0:d], masks[0:n, 0:masks.shape[1]])
                    T.writes(out[i, task * hpt:task * hpt + hpt, 0:d])
                    m = T.alloc_buffer((hpt,), "float32", scope="local")
                    total = T.alloc_buffer((hpt,), "float32", scope="local")
                    acc = T.alloc_buffer((hpt, d), "float32", scope="local")
                    score = T.alloc_buffer((hpt, tile), "float32", scope="local")
                    part = T.alloc_buffer((hpt, lanes), "float32", scope="local")
                    m_new = T.alloc_buffer((hpt,), "float32", scope="local")
                    rescale = T.alloc_buffer((hpt,), "float32", scope="local")
                    # finite MASKED: a row always has its own token, so no row is fully masked
                    init_state(m, total, acc)
                    for jt in range((past + n + tile - 1) // tile):
                        for t in range(tile):
                            if key(jt, t) < past + n and visible(masks, i, key(jt, t), past, n):
                                for g, lane in T.grid(hpt, lanes):
                                    part[g, lane] = T.float32(0)
                                for xo in range(d // lanes):
                                    for g in T.unroll(hpt):
                                        for lane in simd(lanes):
                                            part[g, lane] = part[g, lane] + q[
                                                i, task * hpt + g, xo * lanes + lane] * kc[
                                                task * hpt // group, key(jt, t),
                                                xo * lanes + lane]
                                for g in range(hpt):
                                    score[g, t] = T.float32(0)
                                    for lane in range(lanes):
                                        score[g, t] = score[g, t] + part[g, lane]
                                    score[g, t] = capped(score[g, t] * T.float32(scale))
                            else:
                                for g in range(hpt):
                                    score[g, t] = T.float32(MASKED)
                        for g in range(hpt):
                            m_new[g] = m[g]
                            for t in range(tile):
                                m_new[g] = T.max(m_new[g], score[g, t])
                            rescale[g] = T.exp(m[g] - m_new[g])
                            total[g] = total[g] * rescale[g]
                            m[g] = m_new[g]
                        for g in T.unroll(hpt):
                            for x in simd(d):
                                acc[g, x] = acc[g, x] * rescale[g]
                        # the tile's weights first, then the V accumulation: no exp call among
                        # the vector accumulators (a call would spill them on every key)
                        for t in range(tile):
                            for g in range(hpt):
                                if score[g, t] > T.float32(MASKED / 2):  # an allowed key
                                    score[g, t] = T.exp(score[g, t] - m[g])
                                else:
                                    score[g, t] = T.float32(0)
                                total[g] = total[g] + score[g, t]
                        for t in range(tile):  # masked keys weigh 0; read in bounds
                            for g in T.unroll(hpt):
                                for x in simd(d):
                                    acc[g, x] = acc[g, x] + score[g, t] * vc[
                                        task * hpt // group, T.min(key(jt, t), past + n - 1), x]
                    store_state(out, i, task * hpt, acc, total)

    name = "edgert_tree_attention" if mask == "tree" else "edgert_masked_attention"
    return tree_attention.with_attr("global_symbol", name)


def kv_append_tir(num_kv_heads: int, head_dim: int, gpu: bool = False):
    """cache[:, past + t, :] = new[t] for the n new entries only (in place)."""
    from tvm.script import tirx as T

    hkv, d = num_kv_heads, head_dim
    # GPU: a thread per (entry, element); CPU: a plain serial copy of q x Hkv x D floats
    # (a thread-pool launch costs more than copying a decode step's entries)
    outer, inner = loop_mapping(gpu) if gpu else (lambda e: T.serial(e),
                                                  lambda e: T.vectorized(e))
    lanes = hkv * d

    @T.prim_func(private=True, s_tir=True)
    def kv_append(var_cache: T.handle, var_new: T.handle, past: T.int64):
        T.func_attr({"tirx.is_scheduled": True})
        cap = T.int64()
        n = T.int64()
        cache = T.match_buffer(var_cache, (hkv, cap, d), "float32")
        new = T.match_buffer(var_new, (n, hkv, d), "float32")
        for t in outer(n):
            for hx in inner(lanes):
                with T.sblock("append"):
                    vt = T.axis.spatial(n, t)
                    vhx = T.axis.spatial(hkv * d, hx)
                    cache[vhx // d, past + vt, vhx % d] = new[vt, vhx // d, vhx % d]

    return kv_append.with_attr("global_symbol", "edgert_kv_append")
