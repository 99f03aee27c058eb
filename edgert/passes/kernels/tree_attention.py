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

``kv_append`` writes the new K or V entries into the cache in place (only those n entries).
Both kernels come as one TIR template with two loop mappings: GPU (blocks x threads) and CPU
(serial x parallel).
"""

from __future__ import annotations

import math

import numpy as np

MASKED = -1e30  # finite: a row always has its own token, so no row is fully masked


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


def tree_attention_reference(q, k_cache, v_cache, order, past: int) -> np.ndarray:
    """NumPy reference: q [n,Hq,D], caches [Hkv,C,D] (new entries at [past, past+n))."""
    n, hq, d = q.shape
    group = hq // k_cache.shape[0]
    total = past + n
    keys = np.repeat(k_cache[:, :total], group, axis=0)  # [Hq,T,D]
    values = np.repeat(v_cache[:, :total], group, axis=0)
    scores = np.einsum("ihd,htd->hit", q, keys) / math.sqrt(d)
    pre, end = order[:, 0], order[:, 1]
    tree_ok = (pre[None, :] <= pre[:, None]) & (pre[:, None] < end[None, :])  # [i, j]
    ok = np.concatenate([np.ones((n, past), bool), tree_ok], axis=1)
    scores = np.where(ok[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hit,htd->ihd", probs, values)


def _loops(gpu: bool):
    """(outer, inner) loop constructors: GPU thread binding, or CPU serial x parallel."""
    from tvm.script import tirx as T

    if gpu:
        return (lambda e: T.thread_binding(e, thread="blockIdx.x"),
                lambda e: T.thread_binding(e, thread="threadIdx.x"))
    return (lambda e: T.serial(e), lambda e: T.parallel(e))


def tree_attention_tir(num_heads: int, num_kv_heads: int, head_dim: int, gpu: bool = False):
    """The kernel as TIR: one (query, head) pair per thread (GPU: blocks x threads; CPU:
    heads in parallel), an online softmax over the allowed keys, so no score matrix is
    materialised. Marked scheduled: dlight's generic rules cannot schedule fused attention."""
    from tvm.script import tirx as T

    hq, hkv, d = num_heads, num_kv_heads, head_dim
    group = hq // hkv
    scale = 1.0 / math.sqrt(d)
    outer, inner = _loops(gpu)

    @T.prim_func(private=True, s_tir=True)
    def tree_attention(var_q: T.handle, var_kc: T.handle, var_vc: T.handle,
                       var_order: T.handle, past: T.int64, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n = T.int64()
        cap = T.int64()
        q = T.match_buffer(var_q, (n, hq, d), "float32")
        kc = T.match_buffer(var_kc, (hkv, cap, d), "float32")
        vc = T.match_buffer(var_vc, (hkv, cap, d), "float32")
        order = T.match_buffer(var_order, (n, 2), "int32")
        out = T.match_buffer(var_out, (n, hq, d), "float32")
        for bi in outer(n):
            for th in inner(hq):
                with T.sblock("attention"):
                    i = T.axis.spatial(n, bi)
                    h = T.axis.spatial(hq, th)
                    T.reads(q[i, h, 0:d], kc[h // group, 0:cap, 0:d],
                            vc[h // group, 0:cap, 0:d], order[0:n, 0:2])
                    T.writes(out[i, h, 0:d])
                    m = T.alloc_buffer((1,), "float32", scope="local")
                    total = T.alloc_buffer((1,), "float32", scope="local")
                    dot = T.alloc_buffer((1,), "float32", scope="local")
                    acc = T.alloc_buffer((d,), "float32", scope="local")
                    m[0] = T.float32(MASKED)
                    total[0] = T.float32(0)
                    for x in range(d):
                        acc[x] = T.float32(0)
                    for j in range(past + n):
                        if j < past or (order[j - past, 0] <= order[i, 0]
                                        and order[i, 0] < order[j - past, 1]):
                            dot[0] = T.float32(0)
                            for x in range(d):
                                dot[0] = dot[0] + q[i, h, x] * kc[h // group, j, x]
                            dot[0] = dot[0] * T.float32(scale)
                            m_new = T.max(m[0], dot[0])
                            correction = T.exp(m[0] - m_new)
                            p = T.exp(dot[0] - m_new)
                            total[0] = total[0] * correction + p
                            for x in range(d):
                                acc[x] = acc[x] * correction + p * vc[h // group, j, x]
                            m[0] = m_new
                    for x in range(d):
                        out[i, h, x] = acc[x] / total[0]

    return tree_attention.with_attr("global_symbol", "edgert_tree_attention")


def kv_append_tir(num_kv_heads: int, head_dim: int, gpu: bool = False):
    """cache[:, past + t, :] = new[t] for the n new entries only (in place)."""
    from tvm.script import tirx as T

    hkv, d = num_kv_heads, head_dim
    outer, inner = _loops(gpu)

    @T.prim_func(private=True, s_tir=True)
    def kv_append(var_cache: T.handle, var_new: T.handle, past: T.int64):
        T.func_attr({"tirx.is_scheduled": True})
        cap = T.int64()
        n = T.int64()
        cache = T.match_buffer(var_cache, (hkv, cap, d), "float32")
        new = T.match_buffer(var_new, (n, hkv, d), "float32")
        for t in outer(n):
            for hx in inner(hkv * d):
                with T.sblock("append"):
                    vt = T.axis.spatial(n, t)
                    vhx = T.axis.spatial(hkv * d, hx)
                    cache[vhx // d, past + vt, vhx % d] = new[vt, vhx // d, vhx % d]

    return kv_append.with_attr("global_symbol", "edgert_kv_append")
