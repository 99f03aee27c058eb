"""Matmul against a constant weight, the weight packed in column panels (CPU).

Decode is a matrix-vector product: every weight byte is read once per step, so the kernel's
job is to stream the weight at memory bandwidth. The weight W [K, N] is packed at compile
time into ``bn``-column panels, each contiguous in memory:

    Wp[p, k, c] = W[k, p * bn + c]          Wp: [N / bn, K, bn]

One parallel task walks ``streams`` neighbouring panels side by side, each from start to end,
multiplying ``mb`` input rows at a time (``mb * streams * bn`` accumulators held in vector
registers): several sequential streams keep more cache-line fills in flight than one (a core
alone cannot saturate DRAM with one stream), and a Medusa tree of q rows reads each panel
once per ``mb`` rows instead of once per row.

    x    [b, m, K]   (b, m dynamic: [1, 1] for decode, [1, q] for a tree or a prefill chunk;
                     rows = b * m, read in place: no reshape around the call)
    Wp   [N / bn, K, bn]
    out  [b, m, N]

The knobs (bn, mb, streams) are what ``edgert tune`` searches; ``DEFAULT`` is the untuned choice.
``packed_take`` reads embedding rows out of the same packed tensor, so a tied embedding and
lm_head stay one copy in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MatmulKnobs:
    bn: int = 16  # columns per panel (one AVX2 register holds 8 floats)
    mb: int = 1  # input rows per pass over a panel
    streams: int = 1  # panels one task walks side by side (more memory streams in flight)

    def fits(self, n: int) -> bool:
        return n % self.bn == 0 and (n // self.bn) % self.streams == 0


DEFAULT = MatmulKnobs()
MAX_ACCUMULATORS = 128  # floats held across the K loop: 16 AVX2 registers
SEARCH_SPACE = [MatmulKnobs(bn, mb, streams) for bn in (8, 16, 32, 64, 128) for mb in (1, 2, 4)
                for streams in (1, 2, 4, 8, 16) if bn * mb * streams <= MAX_ACCUMULATORS]


def pack_weight(weight: np.ndarray, bn: int) -> np.ndarray:
    """W [K, N] -> Wp [N / bn, K, bn] (contiguous panels)."""
    k, n = weight.shape
    return np.ascontiguousarray(weight.reshape(k, n // bn, bn).transpose(1, 0, 2))


def panel_loop(knobs: MatmulKnobs, tasks: int, body):
    """The loop nest of a panel kernel (this packed matmul and ``quant_matmul``), a TVMScript
    macro ``loop(b, m, *buffers)``: a parallel task per ``streams`` panels, row groups of
    ``mb`` rows of x [b, m, K], one sblock each, calling the kernel's macro
    ``body(vt, vr, b, m, *buffers)`` (the task, the row group)."""
    from tvm.script import tirx as T

    mb = knobs.mb

    @T.macro
    def loop(b, m, *buffers):
        for task in T.parallel(tasks):
            for rows in range((b * m + mb - 1) // mb):
                with T.sblock("panels"):
                    vt = T.axis.spatial(tasks, task)
                    vr = T.axis.spatial((b * m + mb - 1) // mb, rows)
                    body(vt, vr, b, m, *buffers)

    return loop


def panel_accumulators(knobs: MatmulKnobs):
    """TVMScript macros of a panel kernel's accumulators [mb, streams, bn]: ``zero(acc)``,
    and ``store(out, acc, vt, vr, b, m)``, which writes them to the row group's rows of
    ``out`` [b, m, N] at the task's panels (rows past ``b * m`` are dropped)."""
    from tvm.script import tirx as T

    bn, mb, streams = knobs.bn, knobs.mb, knobs.streams

    @T.macro
    def zero(acc):
        for r, s in T.grid(mb, streams):
            for c in T.vectorized(bn):
                acc[r, s, c] = T.float32(0)

    @T.macro
    def store(out, acc, vt, vr, b, m):
        for r, s in T.grid(mb, streams):
            if vr * mb + r < b * m:
                for c in T.vectorized(bn):
                    out[(vr * mb + r) // m, (vr * mb + r) % m,
                        (vt * streams + s) * bn + c] = acc[r, s, c]

    return zero, store


def clamped_row(r, b, m):
    """A flat row index of x [b, m, K], clamped to the last row (a PrimExpr; call while
    parsing): the rows past b*m of the last partial group recompute the last one."""
    from tvm.script import tirx as T

    return T.min(r, b * m - 1)


def packed_matmul_tir(k_dim: int, n_dim: int, knobs: MatmulKnobs = DEFAULT):
    """out [b, m, N] = x [b, m, K] @ W, W given packed (see module docstring)."""
    from tvm.script import tirx as T

    if not knobs.fits(n_dim):
        raise ValueError(f"panel width {knobs.bn} x {knobs.streams} streams does not divide "
                         f"N={n_dim}")
    bn, mb, streams = knobs.bn, knobs.mb, knobs.streams
    panels = n_dim // bn
    tasks = panels // streams
    zero, store = panel_accumulators(knobs)
    row = clamped_row

    @T.macro
    def body(vt, vr, b, m, x, w, out):
        T.reads(x[0:b, 0:m, 0:k_dim], w[vt * streams:vt * streams + streams, 0:k_dim, 0:bn])
        T.writes(out[0:b, 0:m, vt * streams * bn:vt * streams * bn + streams * bn])
        acc = T.alloc_buffer((mb, streams, bn), "float32", scope="local")
        zero(acc)
        for kk in range(k_dim):
            for r in T.unroll(mb):
                for s in T.unroll(streams):
                    for c in T.vectorized(bn):
                        acc[r, s, c] = acc[r, s, c] + x[
                            row(vr * mb + r, b, m) // m, row(vr * mb + r, b, m) % m,
                            kk] * w[vt * streams + s, kk, c]
        store(out, acc, vt, vr, b, m)

    loop = panel_loop(knobs, tasks, body)

    @T.prim_func(private=True, s_tir=True)
    def packed_matmul(var_x: T.handle, var_w: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        m = T.int64()
        x = T.match_buffer(var_x, (b, m, k_dim), "float32")
        w = T.match_buffer(var_w, (panels, k_dim, bn), "float32")
        out = T.match_buffer(var_out, (b, m, n_dim), "float32")
        loop(b, m, x, w, out)

    return packed_matmul


def packed_take_tir(k_dim: int, n_dim: int, bn: int):
    """out [K, t] = W[:, ids] (the ONNX Gather of a tied embedding), W given packed."""
    from tvm.script import tirx as T

    panels = n_dim // bn

    @T.prim_func(private=True, s_tir=True)
    def packed_take(var_w: T.handle, var_ids: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        t = T.int64()
        w = T.match_buffer(var_w, (panels, k_dim, bn), "float32")
        ids = T.match_buffer(var_ids, (t,), "int64")
        out = T.match_buffer(var_out, (k_dim, t), "float32")
        for kk in T.parallel(k_dim):
            for j in range(t):
                with T.sblock("take"):
                    vk = T.axis.spatial(k_dim, kk)
                    vj = T.axis.spatial(t, j)
                    T.reads(w[0:panels, vk, 0:bn], ids[vj])
                    T.writes(out[vk, vj])
                    token = T.max(T.min(ids[vj], T.int64(n_dim - 1)), T.int64(0))
                    out[vk, vj] = w[token // bn, vk, token % bn]

    return packed_take


def matmul_workload(k_dim: int, n_dim: int) -> str:
    """The tuning-database name of the [K, N] packed matmul."""
    return f"matmul_{k_dim}_{n_dim}"
