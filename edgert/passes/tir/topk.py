"""Row-wise top-k (largest first; ties to the lower index, as ONNX TopK) without a sort.

    x        [rows, V] float32
    values   [rows, k] float32     descending
    indices  [rows, k] int64 | int32

A row is split across ``lanes`` lanes: lane l keeps its own top-k of x[row, l::lanes] by
insertion (k compares per element, no sort of V), writes it to a [lanes, k] scratch, and lane 0
merges the lanes * k candidates. GPU: a block per row, a thread per lane, the scratch in shared
memory; CPU: a parallel loop over rows, the lanes serial. Medusa's heads take the top-k of a
vocab-long row for a handful of rows: TVM's generic GPU top-k sorts the whole row and uses
blockIdx.z, which WebGPU does not have.

Insertion is branch-light: with the list sorted best-first, "x beats entry i" holds for a suffix
of the list, so walking i = k-1 .. 0 each slot either takes its upper neighbour (x beats that
too), or x (x beats only this one), or stays, with no early exit.
"""

from __future__ import annotations

import numpy as np

from edgert.passes.tir.common import loop_mapping, negative_infinity

GPU_LANES = 256  # WebGPU's default maximum threads per workgroup
NO_INDEX = np.iinfo(np.int32).max  # the index of an empty slot: any element beats it


def topk_reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference: the k largest of each row, ties to the lower index."""
    order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, order, axis=-1), order


def topk_tir(k: int, gpu: bool = False, index_dtype: str = "int64", lanes: int | None = None):
    """The ``edgert_topk`` PrimFunc (rows and V symbolic, int64 shapes; k static)."""
    from tvm.script import tirx as T

    lanes = lanes or (GPU_LANES if gpu else 1)
    rows_loop, lane_loop = loop_mapping(gpu)
    scratch = "shared" if gpu else ""

    # the lists' names are WGSL identifiers too: not `where`, a reserved word in WGSL
    def beats(val, idx, best, best_at, i):
        return T.Or(val > best[i], T.And(val == best[i], idx < best_at[i]))

    @T.macro
    def insert(best, best_at, val, idx):
        for s in range(k):
            i = k - 1 - s
            if T.And(i > 0, beats(val, idx, best, best_at, T.max(i - 1, 0))):
                best[i] = best[T.max(i - 1, 0)]
                best_at[i] = best_at[T.max(i - 1, 0)]
            else:
                if beats(val, idx, best, best_at, i):
                    best[i] = val
                    best_at[i] = idx

    @T.macro
    def clear(best, best_at):
        for s in range(k):
            best[s] = negative_infinity()
            best_at[s] = NO_INDEX

    @T.prim_func(private=True, s_tir=True)
    def topk(var_x: T.handle, var_values: T.handle, var_indices: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        rows = T.int64()
        v = T.int64()
        x = T.match_buffer(var_x, (rows, v), "float32")
        values = T.match_buffer(var_values, (rows, k), "float32")
        indices = T.match_buffer(var_indices, (rows, k), index_dtype)
        for r in rows_loop(rows):
            with T.sblock("row"):
                vr = T.axis.spatial(rows, r)
                T.reads(x[vr, 0:v])
                T.writes(values[vr, 0:k], indices[vr, 0:k])
                cand_val = T.alloc_buffer((lanes, k), "float32", scope=scratch or "global")
                cand_idx = T.alloc_buffer((lanes, k), "int32", scope=scratch or "global")
                best = T.alloc_buffer((k,), "float32", scope="local")
                best_at = T.alloc_buffer((k,), "int32", scope="local")
                # a candidate read into registers first (a shared-memory load may not sit in
                # an if condition: TVM's barrier insertion cannot place it)
                cand = T.alloc_buffer((1,), "float32", scope="local")
                cand_at = T.alloc_buffer((1,), "int32", scope="local")
                for lane in lane_loop(lanes):
                    clear(best, best_at)
                    for j in range(T.ceildiv(v, lanes)):
                        if j * lanes + lane < v:
                            insert(best, best_at, x[vr, j * lanes + lane],
                                   T.Cast("int32", j * lanes + lane))
                    for s in range(k):
                        cand_val[lane, s] = best[s]
                        cand_idx[lane, s] = best_at[s]
                for lane in lane_loop(lanes):
                    if lane == 0:
                        clear(best, best_at)
                        for o, s in T.grid(lanes, k):
                            cand[0] = cand_val[o, s]
                            cand_at[0] = cand_idx[o, s]
                            insert(best, best_at, cand[0], cand_at[0])
                        for s in range(k):
                            values[vr, s] = best[s]
                            indices[vr, s] = T.Cast(index_dtype, best_at[s])

    return topk.with_attr("global_symbol", "edgert_topk")
