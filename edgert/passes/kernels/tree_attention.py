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


def tree_attention_te(num_heads: int, num_kv_heads: int, head_dim: int, dtype: str = "float32"):
    """The kernel as a TE PrimFunc with symbolic n (new tokens), C (capacity), past."""
    from tvm import te, tirx

    n = tirx.Var("n", "int64")
    cap = tirx.Var("cap", "int64")
    past = tirx.Var("past", "int64")
    group = num_heads // num_kv_heads
    q = te.placeholder((n, num_heads, head_dim), dtype, name="q")
    k_cache = te.placeholder((num_kv_heads, cap, head_dim), dtype, name="k_cache")
    v_cache = te.placeholder((num_kv_heads, cap, head_dim), dtype, name="v_cache")
    order = te.placeholder((n, 2), "int32", name="order")
    total = past + n
    scale = 1.0 / math.sqrt(head_dim)
    rd = te.reduce_axis((0, head_dim), name="rd")
    qs = te.compute((n, num_heads, head_dim),
                    lambda i, h, x: q[i, h, x] * tirx.const(scale, dtype), name="q_scaled")
    score = te.compute(
        (num_heads, n, total),
        lambda h, i, j: te.sum(qs[i, h, rd] * k_cache[h // group, j, rd], axis=rd),
        name="score")

    def allowed(i, j):
        node = j - past
        return tirx.if_then_else(
            j < past, tirx.const(True, "bool"),
            tirx.all(order[node, 0] <= order[i, 0], order[i, 0] < order[node, 1]))

    masked = te.compute(
        (num_heads, n, total),
        lambda h, i, j: tirx.if_then_else(allowed(i, j), score[h, i, j],
                                          tirx.const(MASKED, dtype)), name="masked")
    rj = te.reduce_axis((0, total), name="rj")
    row_max = te.compute((num_heads, n), lambda h, i: te.max(masked[h, i, rj], axis=rj),
                         name="row_max")
    expd = te.compute((num_heads, n, total),
                      lambda h, i, j: te.exp(masked[h, i, j] - row_max[h, i]), name="expd")
    rj2 = te.reduce_axis((0, total), name="rj2")
    row_sum = te.compute((num_heads, n), lambda h, i: te.sum(expd[h, i, rj2], axis=rj2),
                         name="row_sum")
    rj3 = te.reduce_axis((0, total), name="rj3")
    acc = te.compute((n, num_heads, head_dim),
                     lambda i, h, x: te.sum(expd[h, i, rj3] * v_cache[h // group, rj3, x],
                                            axis=rj3), name="acc")
    out = te.compute((n, num_heads, head_dim),
                     lambda i, h, x: acc[i, h, x] / row_sum[h, i], name="out")
    # call_tir order: inputs, scalar args, then the output buffer
    func = te.create_prim_func([q, k_cache, v_cache, order, past, out])
    return func.with_attr("global_symbol", "edgert_tree_attention")


def kv_append_tir(num_kv_heads: int, head_dim: int, dtype: str = "float32"):
    """cache[:, past + t, :] = new[t] for the n new entries only (in place)."""
    from tvm.script import tirx as T

    hkv, d = num_kv_heads, head_dim

    @T.prim_func(private=True, s_tir=True)
    def kv_append(var_cache: T.handle, var_new: T.handle, past: T.int64):
        cap = T.int64()
        n = T.int64()
        cache = T.match_buffer(var_cache, (hkv, cap, d), dtype)
        new = T.match_buffer(var_new, (n, hkv, d), dtype)
        for t, h, x in T.grid(n, hkv, d):
            with T.sblock("append"):
                vt, vh, vx = T.axis.remap("SSS", [t, h, x])
                cache[vh, past + vt, vx] = new[vt, vh, vx]

    return kv_append.with_attr("global_symbol", "edgert_kv_append")
