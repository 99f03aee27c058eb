"""DHSA chunk boundaries as one TIR kernel: probe attention, mass ratios, NMS, chunk starts.

Computes what ``edgert.dhsa.reference`` (``chunk_starts(boundary_ratios(q, k))``) and the
``model.dhsa.onnx`` graph (``DHSACore.chunk_starts``) compute, once per prompt, at the
boundary layer; every later layer's ``edgert_dhsa_attention`` reads the result:

    q            [T, Hq, D]   float32 (rotary applied)
    k            [T, Hkv, D]  float32
    fixed_chunk  int32        0: dynamic boundaries; N > 0: a chunk every N tokens
    starts       [T] int32    1 where a key chunk starts

Probe queries: the strided rows ``r = (i + 1) * probe_stride - 1`` below ``T - tail`` and the
last ``tail = max(dense_tail, 1)`` rows (the graph's order; the reference's set). Stages, each
one sblock over a flat work space (a GPU kernel launch, or one CPU parallel loop):

    probe_softmax    (i, h)   max and sum of the causal softmax of probe i, head h (online)
    probe_attention  (i, t)   A[i, t] = mean_h softmax(...)[t], written to csum[i, t + 1]
    probe_prefix     (i)      csum[i] = prefix sums of A[i] (csum[i, 0] = 0)
    ratios           (c)      past/future mass around c over probes r >= c + w -> ratio[c]
    starts           (t)      token 0, peaks (ratio >= threshold and the max within
                              +-nms_radius) shifted by one, and the dense tail's first token;
                              or t % fixed_chunk == 0 when fixed_chunk > 0

With ``fixed_chunk > 0`` the first four stages do nothing. Workspace: the softmax statistics
[R, Hq] (twice), csum [R, T + 1], ratio [T] (R = number of probes, about T / probe_stride +
tail). One TIR template, two loop mappings as in ``kernels.dhsa_attention`` (GPU: blockIdx.x x
threadIdx.x, a thread per work item; CPU: a parallel loop over the items).
"""

from __future__ import annotations

import math

from edgert.dhsa.params import BOUNDARY_EPS as EPS
from edgert.dhsa.params import DHSAParams
from edgert.passes.tir.common import MASKED, dot_lanes_for, flat_axes, index_type, stage_mapping


def dhsa_boundaries_tir(num_heads: int, num_kv_heads: int, head_dim: int, params: DHSAParams,
                        gpu: bool = False, index_dtype: str = "int64"):
    """The boundary kernel as one PrimFunc (global symbol ``edgert_dhsa_boundaries``); see the
    module docstring for the stages. Marked scheduled: dlight's generic rules cannot schedule
    it."""
    from tvm.script import tirx as T

    hq, hkv, d = num_heads, num_kv_heads, head_dim
    group = hq // hkv
    w, stride, radius = params.boundary_window, params.probe_stride, params.nms_radius
    tail = max(params.dense_tail, 1)  # probe rows at the end (the graph's rule)
    dense_tail = params.dense_tail  # the chunk the instruction starts
    threshold = float(params.boundary_threshold)
    scale = 1.0 / math.sqrt(d)
    outer, inner, vector, lanes = stage_mapping(gpu)
    dot_lanes = dot_lanes_for(d)
    length, index = index_type(index_dtype)

    def n_strided(n):  # strided probes: rows (i + 1) * stride - 1 < n - tail
        return T.max(n - tail, 0) // stride

    def n_probes(n):
        return n_strided(n) + T.min(n, tail)

    def probe_row(i, n):
        return T.Select(i < n_strided(n), (i + 1) * stride - 1,
                        T.max(n - tail, 0) + (i - n_strided(n)))

    @T.macro
    def score(q, k, r, h, t, dot, partial):
        """dot[0] = q[r, h] . k[t, h // group] / sqrt(D)."""
        for x in vector(dot_lanes):
            partial[x] = T.float32(0)
        for xo in range(d // dot_lanes):
            for x in vector(dot_lanes):
                partial[x] = partial[x] + (q[r, h, xo * dot_lanes + x]
                                           * k[t, h // group, xo * dot_lanes + x])
        dot[0] = T.float32(0)
        for x in range(dot_lanes):
            dot[0] = dot[0] + partial[x]
        dot[0] = dot[0] * T.float32(scale)

    def clamp(i, n):  # TIR's `and`/`or` do not short-circuit: keep guarded reads in bounds
        return T.max(T.min(i, n - 1), index(0))

    @T.prim_func(private=True, s_tir=True)
    def dhsa_boundaries(var_q: T.handle, var_k: T.handle, fixed_chunk: T.int32,
                        var_starts: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n = length()
        q = T.match_buffer(var_q, (n, hq, d), "float32")
        k = T.match_buffer(var_k, (n, hkv, d), "float32")
        starts = T.match_buffer(var_starts, (n,), "int32")
        row_max = T.alloc_buffer((n_probes(n), hq), "float32")
        row_total = T.alloc_buffer((n_probes(n), hq), "float32")
        csum = T.alloc_buffer((n_probes(n), n + 1), "float32")
        ratio = T.alloc_buffer((n,), "float32")

        for g in outer(T.ceildiv(n_probes(n) * hq, lanes)):
            for lane in inner(lanes):
                with T.sblock("probe_softmax"):
                    i, h = flat_axes(g * lanes + lane, n_probes(n), hq)
                    T.reads(q[0:n, h, 0:d], k[0:n, h // group, 0:d])
                    T.writes(row_max[i, h], row_total[i, h])
                    m = T.alloc_buffer((1,), "float32", scope="local")
                    total = T.alloc_buffer((1,), "float32", scope="local")
                    dot = T.alloc_buffer((1,), "float32", scope="local")
                    partial = T.alloc_buffer((dot_lanes,), "float32", scope="local")
                    if fixed_chunk <= 0:
                        m[0] = T.float32(MASKED)
                        total[0] = T.float32(0)
                        for t in range(probe_row(i, n) + 1):
                            score(q, k, probe_row(i, n), h, t, dot, partial)
                            m_new = T.max(m[0], dot[0])
                            total[0] = total[0] * T.exp(m[0] - m_new) + T.exp(dot[0] - m_new)
                            m[0] = m_new
                        row_max[i, h] = m[0]
                        row_total[i, h] = total[0]

        for g in outer(T.ceildiv(n_probes(n) * n, lanes)):
            for lane in inner(lanes):
                with T.sblock("probe_attention"):
                    i, t = flat_axes(g * lanes + lane, n_probes(n), n)
                    T.reads(q[0:n, 0:hq, 0:d], k[t, 0:hkv, 0:d], row_max[i, 0:hq],
                            row_total[i, 0:hq])
                    T.writes(csum[i, 0:n + 1])
                    mass = T.alloc_buffer((1,), "float32", scope="local")
                    dot = T.alloc_buffer((1,), "float32", scope="local")
                    partial = T.alloc_buffer((dot_lanes,), "float32", scope="local")
                    if fixed_chunk <= 0:
                        mass[0] = T.float32(0)
                        if t <= probe_row(i, n):
                            for h in range(hq):
                                score(q, k, probe_row(i, n), h, t, dot, partial)
                                mass[0] = mass[0] + T.exp(dot[0] - row_max[i, h]) / row_total[
                                    i, h]
                        csum[i, t + 1] = mass[0] / T.float32(hq)
                        if t == 0:
                            csum[i, 0] = T.float32(0)

        for g in outer(T.ceildiv(n_probes(n), lanes)):
            for lane in inner(lanes):
                with T.sblock("probe_prefix"):
                    i = flat_axes(g * lanes + lane, n_probes(n))
                    T.reads(csum[i, 0:n + 1])
                    T.writes(csum[i, 0:n + 1])
                    if fixed_chunk <= 0:
                        for t in range(n):
                            csum[i, t + 1] = csum[i, t + 1] + csum[i, t]

        for g in outer(T.ceildiv(n, lanes)):
            for lane in inner(lanes):
                with T.sblock("ratios"):
                    c = flat_axes(g * lanes + lane, n)
                    T.reads(csum[0:n_probes(n), 0:n + 1])
                    T.writes(ratio[c])
                    past = T.alloc_buffer((1,), "float32", scope="local")
                    future = T.alloc_buffer((1,), "float32", scope="local")
                    if fixed_chunk <= 0:
                        ratio[c] = T.float32(0)
                        if c >= 2 * w - 1 and c < n - 2 * w:  # c + w < n: the sums are in bounds
                            past[0] = T.float32(0)
                            future[0] = T.float32(0)
                            for i in range(n_probes(n)):
                                if probe_row(i, n) >= c + w:
                                    past[0] = past[0] + (csum[i, c + 1] - csum[i, c - w + 1])
                                    future[0] = future[0] + (csum[i, c + w + 1] - csum[i, c + 1])
                            ratio[c] = (T.max(past[0], future[0]) + T.float32(EPS)) / (
                                T.min(past[0], future[0]) + T.float32(EPS))

        for g in outer(T.ceildiv(n, lanes)):
            for lane in inner(lanes):
                with T.sblock("starts"):
                    t = flat_axes(g * lanes + lane, n)
                    T.reads(ratio[0:n])
                    T.writes(starts[t])
                    window = T.alloc_buffer((1,), "float32", scope="local")
                    if fixed_chunk > 0:
                        starts[t] = T.Cast("int32", t % index(fixed_chunk) == 0)
                    elif t == 0 or t == n - dense_tail:  # (dense_tail 0: never, t < n)
                        starts[t] = 1
                    else:  # a boundary after c = t - 1: its ratio peaks within +-radius
                        window[0] = ratio[t - 1]
                        for j in range(2 * radius + 1):
                            if t - 1 - radius + j >= 0 and t - 1 - radius + j < n:
                                window[0] = T.max(window[0], ratio[clamp(t - 1 - radius + j, n)])
                        starts[t] = T.Cast("int32", T.And(ratio[t - 1] >= T.float32(threshold),
                                                          ratio[t - 1] >= window[0]))

    return dhsa_boundaries.with_attr("global_symbol", "edgert_dhsa_boundaries")
