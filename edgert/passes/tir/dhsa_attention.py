"""DHSA prefill attention as one fused TIR kernel: chunk scores, key selection, sparse attention.

Computes what ``edgert.dhsa.reference`` computes for given chunk starts (causal, GQA):

    q       [T, Hq, D]   float32 (rotary applied)
    k, v    [T, Hkv, D]  float32
    starts  [T] int32    1 where a key chunk starts (token 0 always starts one)
    out     [T, Hq, D]   float32

T is dynamic; the head counts, D and every DHSA parameter are compile-time constants. The
PrimFunc runs eight stages in order, each one sblock over a flat work space (a GPU kernel
launch, or one CPU parallel loop), their intermediates in workspace buffers:

    chunk_list      (1 item)      pos[c] = start of chunk c, pos[C] = T, n_chunks = C
    key_mean        (x)           key_mean = mean_{t, h} k[t, h] (0 without center_keys)
    chunk_vectors   (c, x)        chunk_vec[c] = sum_{t in chunk c} (mean_h k[t, h] - key_mean)
                                                 / sqrt(len)
    block_vectors   (b, x)        block_vec[b] = sum_{t in block b} mean_h q[t, h] / sqrt(len)
    chunk_scores    (b, c)        score[b, c] = block_vec[b] . chunk_vec[c]
    chunk_takes     (b, c)        take[b, c]: how many of chunk c's free tokens block b keeps
    selected_keys   (b)           sel_index[b, :sel_count[b]]: block b's keys, ascending
    attention       (p, task)     online softmax of query p, ``heads_per_task`` heads of one KV
                                  group, over its keys in tiles of ``key_tile``

Selection without a sort. Query block b (tokens [b*bs, end)) may see keys t < end; the forced
keys (t < sink, or t >= end - local) come first, so the free keys [sink, end - local) compete
for ``slots = min(budget, T) - forced`` places (the params guarantee forced <= min(budget, T)).
A free key's rank is the number of free keys ahead of it: those of higher-scoring chunks, plus
lower-indexed ones of equal score (the reference's stable argsort). Every token of a chunk has
the chunk's score, so the first free token of chunk c has rank

    rank[b, c] = sum of free[b, c'] over chunks c' with score[b, c'] > score[b, c],
                 or score[b, c'] == score[b, c] and c' < c

and block b keeps the first ``take[b, c] = clamp(slots - rank[b, c], 0, free[b, c])`` free
tokens of chunk c: O(chunks^2) work per block, all (b, c) pairs in parallel.

Query p of block b attends to the selected keys <= p; the last ``dense_tail`` queries attend to
every key <= p. Both use an online softmax, so no [T, T] score matrix is materialised.

Workspace: pos [T+1], chunk_vec [T, D], block_vec [nb, D], score and take [nb, T] (indexed by
chunk id; only the first ``n_chunks`` columns are used), sel_index [nb, budget], sel_count [nb].

One TIR template, two loop mappings: GPU (blockIdx.x x threadIdx.x over each stage's work
items, one thread per item; chunk_list is a single thread) and CPU (a parallel loop over the
items, the attention's head_dim loops vectorized). On GPU the stages are ordered kernel
launches, so each sees the previous one's writes; the workspace is allocated on the device.
Indices are int64 (T is a Relax int64 shape var), or int32 with ``index_dtype="int32"`` for
targets without 64-bit integers (WebGPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgert.dhsa.params import DHSAParams
from edgert.passes.tir.common import (
    MASKED,
    dot_lanes_for,
    flat_axes,
    index_type,
    softmax_state,
    stage_mapping,
)


@dataclass(frozen=True)
class DHSAKnobs:
    """Schedule of the attention stage (searched by ``edgert tune``).

    heads_per_task: query heads of one KV group one work item handles, so each selected K/V
        row is loaded once for all of them (divides the group size).
    key_tile: keys scored before one online-softmax rescale of the accumulators.
    """

    heads_per_task: int = 1
    key_tile: int = 1

    def check(self, num_heads: int, num_kv_heads: int) -> None:
        if (num_heads // num_kv_heads) % self.heads_per_task or self.key_tile < 1:
            raise ValueError(f"DHSA knobs {self} do not fit heads {num_heads}/{num_kv_heads}")


DEFAULT_KNOBS = DHSAKnobs()


def dhsa_search_space(num_heads: int, num_kv_heads: int) -> list[DHSAKnobs]:
    group = num_heads // num_kv_heads
    return [DHSAKnobs(hpt, tile) for hpt in sorted({1, group} | {g for g in (2, 4)
                                                                 if group % g == 0})
            for tile in (1, 8, 32)]


def dhsa_workload(num_heads: int, num_kv_heads: int, head_dim: int) -> str:
    """The tuning-database name of the kernel for this attention shape."""
    return f"dhsa_attention_{num_heads}_{num_kv_heads}_{head_dim}"


def _selection_exprs(params: DHSAParams):
    """Block bounds and the free-key arithmetic of the selection, as PrimExpr builders."""
    from tvm.script import tirx as T

    bs, sink, local = params.block_size, params.sink, params.local

    def block_end(b, n):
        return T.min((b + 1) * bs, n)

    def free_keys(chunk_start, chunk_stop, end):
        """Free keys ([sink, end - local)) inside the chunk [chunk_start, chunk_stop)."""
        return T.max(T.min(chunk_stop, end - local) - T.max(chunk_start, sink), 0)

    def free_slots(end, n):
        """Places left for free keys once the forced ones of a block ending at ``end`` are in."""
        free = T.max(end - local - sink, 0)
        return T.min(params.budget, n) - (end - free)

    def forced(t, end):
        """A sink or local key of the block ending at ``end``."""
        return T.Or(t < sink, t >= end - local)

    return block_end, free_keys, free_slots, forced


def dhsa_attention_tir(num_heads: int, num_kv_heads: int, head_dim: int, params: DHSAParams,
                       gpu: bool = False, knobs: DHSAKnobs = DEFAULT_KNOBS,
                       index_dtype: str = "int64"):
    """The fused kernel as one PrimFunc (see the module docstring for the stages). Each stage
    is a flat loop over ceildiv(items, lanes) x lanes, its sblock axes recovered from the flat
    index (a GPU thread per work item; CPU lanes = 1: the parallel loop is over the items).
    Marked scheduled: dlight's generic rules cannot schedule it."""
    from tvm.script import tirx as T

    hq, hkv, d = num_heads, num_kv_heads, head_dim
    group = hq // hkv
    bs, budget, sink, tail = params.block_size, params.budget, params.sink, params.dense_tail
    center = bool(params.center_keys)
    scale = 1.0 / math.sqrt(d)
    outer, inner, vector, lanes = stage_mapping(gpu)
    dot_lanes = dot_lanes_for(d)
    block_end, free_keys, free_slots, forced = _selection_exprs(params)
    knobs.check(num_heads, num_kv_heads)
    hpt, tile = knobs.heads_per_task, knobs.key_tile
    tasks = hq // hpt
    length, index = index_type(index_dtype)

    def n_blocks(n):
        return T.ceildiv(n, bs)

    def n_keys(p, n, sel_count):
        """Keys query p scans: all of [0, p] in the dense tail, else its block's selection."""
        return T.if_then_else(p >= n - tail, p + 1, index(sel_count[p // bs]))

    def key_at(p, n, j, sel_index):
        # TIR's if_then_else evaluates both sides: clamp the selection index
        return T.if_then_else(p >= n - tail, j,
                              index(sel_index[p // bs, T.min(j, budget - 1)]))

    init_state, store_state = softmax_state(hpt, d)

    @T.macro
    def sum_head_means(src, heads, x, begin, end, head_sum, total):
        """total[0] = sum over t in [begin, end) of mean_h src[t, h, x]."""
        total[0] = T.float32(0)
        for t in range(begin, end):
            head_sum[0] = T.float32(0)
            for h in range(heads):
                head_sum[0] = head_sum[0] + src[t, h, x]
            total[0] = total[0] + head_sum[0] / T.float32(heads)

    @T.macro
    def score_tile(q, k, p, task, key, t, partial, score):
        """score[hh, t] = q[p, head hh of the task] . k[key] / sqrt(D), the K row loaded once
        for the task's heads."""
        for hh, r in T.grid(hpt, dot_lanes):
            partial[hh, r] = T.float32(0)
        for xo in range(d // dot_lanes):
            for r in vector(dot_lanes):  # independent partial sums: a SIMD-friendly dot
                for hh in T.unroll(hpt):
                    partial[hh, r] = partial[hh, r] + (
                        q[p, task * hpt + hh, xo * dot_lanes + r]
                        * k[key, task * hpt // group, xo * dot_lanes + r])
        for hh in range(hpt):
            score[hh, t] = T.float32(0)
            for r in range(dot_lanes):
                score[hh, t] = score[hh, t] + partial[hh, r]
            score[hh, t] = score[hh, t] * T.float32(scale)

    @T.macro
    def rescale(m, m_new, total, acc, score):
        """Online softmax: raise each head's running max to the tile's, rescale its sums."""
        for hh in range(hpt):
            m_new[hh] = m[hh]
            for t in range(tile):
                m_new[hh] = T.max(m_new[hh], score[hh, t])
            total[hh] = total[hh] * T.exp(m[hh] - m_new[hh])
            for x in vector(d):
                acc[hh, x] = acc[hh, x] * T.exp(m[hh] - m_new[hh])
            m[hh] = m_new[hh]

    @T.macro
    def accumulate(v, task, key, t, m, total, score, acc):
        for hh in range(hpt):
            score[hh, t] = T.exp(score[hh, t] - m[hh])
            total[hh] = total[hh] + score[hh, t]
        for x in vector(d):
            for hh in T.unroll(hpt):
                acc[hh, x] = acc[hh, x] + score[hh, t] * v[key, task * hpt // group, x]

    @T.prim_func(private=True, s_tir=True)
    def dhsa_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle,
                       var_starts: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n = length()
        q = T.match_buffer(var_q, (n, hq, d), "float32")
        k = T.match_buffer(var_k, (n, hkv, d), "float32")
        v = T.match_buffer(var_v, (n, hkv, d), "float32")
        starts = T.match_buffer(var_starts, (n,), "int32")
        out = T.match_buffer(var_out, (n, hq, d), "float32")
        pos = T.alloc_buffer((n + 1,), "int32")
        n_chunks = T.alloc_buffer((1,), "int32")
        key_mean = T.alloc_buffer((d,), "float32")
        chunk_vec = T.alloc_buffer((n, d), "float32")
        block_vec = T.alloc_buffer((n_blocks(n), d), "float32")
        score = T.alloc_buffer((n_blocks(n), n), "float32")
        take = T.alloc_buffer((n_blocks(n), n), "int32")
        sel_index = T.alloc_buffer((n_blocks(n), budget), "int32")
        sel_count = T.alloc_buffer((n_blocks(n),), "int32")

        for _g in outer(1):
            for _lane in inner(1):
                with T.sblock("chunk_list"):
                    T.reads(starts[0:n])
                    T.writes(pos[0:n + 1], n_chunks[0])
                    count = T.alloc_buffer((1,), "int32", scope="local")
                    count[0] = 0
                    for t in range(n):
                        if t == 0 or starts[t] != 0:
                            pos[count[0]] = T.Cast("int32", t)
                            count[0] = count[0] + 1
                    pos[count[0]] = T.Cast("int32", n)
                    n_chunks[0] = count[0]

        for g in outer(T.ceildiv(d, lanes)):
            for lane in inner(lanes):
                with T.sblock("key_mean"):
                    x = flat_axes(g * lanes + lane, d)
                    T.reads(k[0:n, 0:hkv, x])
                    T.writes(key_mean[x])
                    mean_sum = T.alloc_buffer((1,), "float32", scope="local")
                    mean_sum[0] = T.float32(0)
                    if center:
                        for t in range(n):
                            for h in range(hkv):
                                mean_sum[0] = mean_sum[0] + k[t, h, x]
                        key_mean[x] = mean_sum[0] / (T.float32(hkv) * T.Cast("float32", n))
                    else:
                        key_mean[x] = mean_sum[0]

        for g in outer(T.ceildiv(n * d, lanes)):
            for lane in inner(lanes):
                with T.sblock("chunk_vectors"):
                    c, x = flat_axes(g * lanes + lane, n, d)
                    T.reads(k[0:n, 0:hkv, x], pos[0:n + 1], n_chunks[0], key_mean[x])
                    T.writes(chunk_vec[c, x])
                    head_sum = T.alloc_buffer((1,), "float32", scope="local")
                    chunk_sum = T.alloc_buffer((1,), "float32", scope="local")
                    if c < index(n_chunks[0]):
                        sum_head_means(k, hkv, x, index(pos[c]), index(pos[c + 1]), head_sum,
                                       chunk_sum)
                        chunk_len = T.Cast("float32", pos[c + 1] - pos[c])
                        chunk_vec[c, x] = (chunk_sum[0] - chunk_len * key_mean[x]) / T.sqrt(
                            chunk_len)

        for g in outer(T.ceildiv(n_blocks(n) * d, lanes)):
            for lane in inner(lanes):
                with T.sblock("block_vectors"):
                    b, x = flat_axes(g * lanes + lane, n_blocks(n), d)
                    T.reads(q[b * bs:block_end(b, n), 0:hq, x])
                    T.writes(block_vec[b, x])
                    head_sum = T.alloc_buffer((1,), "float32", scope="local")
                    block_sum = T.alloc_buffer((1,), "float32", scope="local")
                    sum_head_means(q, hq, x, b * bs, block_end(b, n), head_sum, block_sum)
                    block_vec[b, x] = block_sum[0] / T.sqrt(
                        T.Cast("float32", block_end(b, n) - b * bs))

        for g in outer(T.ceildiv(n_blocks(n) * n, lanes)):
            for lane in inner(lanes):
                with T.sblock("chunk_scores"):
                    b, c = flat_axes(g * lanes + lane, n_blocks(n), n)
                    T.reads(block_vec[b, 0:d], chunk_vec[c, 0:d], n_chunks[0])
                    T.writes(score[b, c])
                    dot = T.alloc_buffer((1,), "float32", scope="local")
                    if c < index(n_chunks[0]):
                        dot[0] = T.float32(0)
                        for x in range(d):
                            dot[0] = dot[0] + block_vec[b, x] * chunk_vec[c, x]
                        score[b, c] = dot[0]

        for g in outer(T.ceildiv(n_blocks(n) * n, lanes)):
            for lane in inner(lanes):
                with T.sblock("chunk_takes"):
                    b, c = flat_axes(g * lanes + lane, n_blocks(n), n)
                    T.reads(score[b, 0:n], pos[0:n + 1], n_chunks[0])
                    T.writes(take[b, c])
                    rank = T.alloc_buffer((1,), "int32", scope="local")
                    if c < index(n_chunks[0]):
                        take[b, c] = 0
                        if free_keys(index(pos[c]), index(pos[c + 1]), block_end(b, n)) > 0:
                            rank[0] = 0
                            for other in range(index(n_chunks[0])):
                                if score[b, other] > score[b, c] or (
                                        score[b, other] == score[b, c] and other < c):
                                    rank[0] = rank[0] + T.Cast("int32", free_keys(
                                        index(pos[other]), index(pos[other + 1]), block_end(b, n)))
                            take[b, c] = T.Cast("int32", T.max(0, T.min(
                                free_slots(block_end(b, n), n) - index(rank[0]),
                                free_keys(index(pos[c]), index(pos[c + 1]), block_end(b, n)))))

        for g in outer(T.ceildiv(n_blocks(n), lanes)):
            for lane in inner(lanes):
                with T.sblock("selected_keys"):
                    b = flat_axes(g * lanes + lane, n_blocks(n))
                    T.reads(pos[0:n + 1], take[b, 0:n])
                    T.writes(sel_index[b, 0:budget], sel_count[b])
                    count = T.alloc_buffer((1,), "int32", scope="local")
                    chunk = T.alloc_buffer((1,), "int32", scope="local")
                    count[0] = 0
                    chunk[0] = 0
                    for t in range(block_end(b, n)):
                        if t == index(pos[chunk[0] + 1]):
                            chunk[0] = chunk[0] + 1
                        if count[0] < budget and (
                                forced(t, block_end(b, n))
                                or t - T.max(index(pos[chunk[0]]), sink)
                                < index(take[b, chunk[0]])):
                            sel_index[b, count[0]] = T.Cast("int32", t)
                            count[0] = count[0] + 1
                    sel_count[b] = count[0]

        for g in outer(T.ceildiv(n * tasks, lanes)):
            for lane in inner(lanes):
                with T.sblock("attention"):
                    p, task = flat_axes(g * lanes + lane, n, tasks)
                    T.reads(q[p, task * hpt:task * hpt + hpt, 0:d],
                            k[0:n, task * hpt // group, 0:d], v[0:n, task * hpt // group, 0:d],
                            sel_index[p // bs, 0:budget], sel_count[p // bs])
                    T.writes(out[p, task * hpt:task * hpt + hpt, 0:d])
                    m = T.alloc_buffer((hpt,), "float32", scope="local")
                    m_new = T.alloc_buffer((hpt,), "float32", scope="local")
                    total = T.alloc_buffer((hpt,), "float32", scope="local")
                    score = T.alloc_buffer((hpt, tile), "float32", scope="local")
                    partial = T.alloc_buffer((hpt, dot_lanes), "float32", scope="local")
                    acc = T.alloc_buffer((hpt, d), "float32", scope="local")
                    init_state(m, total, acc)  # MASKED: every query keeps a key (sink >= 1)
                    # the dense tail attends to every key <= p, other queries to their block's
                    # selected keys <= p (ascending): key slot j of n_keys
                    for jt in range(T.ceildiv(n_keys(p, n, sel_count), tile)):
                        for t in range(tile):
                            if jt * tile + t < n_keys(p, n, sel_count) and key_at(
                                    p, n, jt * tile + t, sel_index) <= p:
                                score_tile(q, k, p, task, key_at(p, n, jt * tile + t, sel_index),
                                           t, partial, score)
                            else:
                                for hh in range(hpt):
                                    score[hh, t] = T.float32(MASKED)
                        rescale(m, m_new, total, acc, score)
                        for t in range(tile):
                            if score[0, t] > T.float32(MASKED / 2):
                                accumulate(v, task, key_at(p, n, jt * tile + t, sel_index), t,
                                           m, total, score, acc)
                    store_state(out, p, task * hpt, acc, total)

    return dhsa_attention.with_attr("global_symbol", "edgert_dhsa_attention")
