"""Small TVMScript kernels the launcher's self-tests run (each made on call: TVM imports
lazily)."""

from __future__ import annotations


def vadd(index: str = "int32"):
    """C = A * alpha + B + off over n elements: a 1-D grid of 64-thread blocks, a float and an
    integer scalar, the shape variable ``n`` of dtype ``index``."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def func(a: T.handle, b: T.handle, c: T.handle, alpha: T.float32, off: T.int32):
        T.func_attr({"global_symbol": "vadd", "tirx.noalias": True})
        n = T.int32() if index == "int32" else T.int64()
        A = T.match_buffer(a, (n,), "float32")
        B = T.match_buffer(b, (n,), "float32")
        C = T.match_buffer(c, (n,), "float32")
        for bx in T.thread_binding(T.ceildiv(n, 64), thread="blockIdx.x"):
            for tx in T.thread_binding(64, thread="threadIdx.x"):
                with T.sblock("c"):
                    i = T.axis.spatial(n, bx * 64 + tx)
                    T.where(bx * 64 + tx < n)
                    C[i] = A[i] * alpha + B[i] + T.Cast("float32", off)

    return func


def shift():
    """out[i] = x[i] + delta with an int64 scalar (narrowed to i32 on WebGPU)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def func(x: T.handle, out: T.handle, delta: T.int64):
        T.func_attr({"global_symbol": "shift", "tirx.noalias": True})
        n = T.int64()
        X = T.match_buffer(x, (n,), "int32")
        Out = T.match_buffer(out, (n,), "int32")
        for bx in T.thread_binding(T.ceildiv(n, 32), thread="blockIdx.x"):
            for tx in T.thread_binding(32, thread="threadIdx.x"):
                with T.sblock("o"):
                    i = T.axis.spatial(n, bx * 32 + tx)
                    T.where(bx * 32 + tx < n)
                    Out[i] = T.Cast("int32", T.Cast("int64", X[i]) + delta)

    return func


def transpose_twice():
    """B = 2 * A^T through a scratch buffer two kernels share: a 2-D grid of 2-D blocks
    (tmp = A^T), then a 1-D pass (B = 2 tmp); int64 shapes."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def func(a: T.handle, b: T.handle):
        T.func_attr({"global_symbol": "transpose_twice", "tirx.noalias": True})
        m = T.int64()
        n = T.int64()
        A = T.match_buffer(a, (m, n), "float32")
        B = T.match_buffer(b, (n, m), "float32")
        tmp = T.alloc_buffer((n, m), "float32")
        for by in T.thread_binding(T.ceildiv(n, 8), thread="blockIdx.y"):
            for bx in T.thread_binding(T.ceildiv(m, 4), thread="blockIdx.x"):
                for ty in T.thread_binding(8, thread="threadIdx.y"):
                    for tx in T.thread_binding(4, thread="threadIdx.x"):
                        with T.sblock("t"):
                            j = T.axis.spatial(n, by * 8 + ty)
                            i = T.axis.spatial(m, bx * 4 + tx)
                            T.where(by * 8 + ty < n and bx * 4 + tx < m)
                            tmp[j, i] = A[i, j]
        for bx in T.thread_binding(T.ceildiv(n * m, 32), thread="blockIdx.x"):
            for tx in T.thread_binding(32, thread="threadIdx.x"):
                with T.sblock("scale"):
                    k = T.axis.spatial(n * m, bx * 32 + tx)
                    T.where(bx * 32 + tx < n * m)
                    B[k // m, k % m] = tmp[k // m, k % m] * T.float32(2)

    return func


def count_items(lanes: int):
    """hits[i] += 1 for every item i < total, ``lanes`` items per block of a
    ``ceildiv(total, lanes)``-long 1-D grid: which work ran, and how often. The sblock's guard
    ``item < total`` stays for lanes > 1 (the last block's padding); with one lane it follows
    from the loop's extent and TVM drops it."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def func(h: T.handle, total: T.int32):
        T.func_attr({"global_symbol": "count_items", "tirx.noalias": True})
        size = T.int32()
        hits = T.match_buffer(h, (size,), "int32")
        for bx in T.thread_binding(T.ceildiv(total, lanes), thread="blockIdx.x"):
            for tx in T.thread_binding(lanes, thread="threadIdx.x"):
                with T.sblock("hit"):
                    i = T.axis.spatial(size, bx * lanes + tx)
                    T.where(bx * lanes + tx < total)
                    hits[i] = hits[i] + 1

    return func


def read_scratch_unwritten():
    """out = scratch, a scratch buffer nothing writes: shows the launcher's poison."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def func(o: T.handle):
        T.func_attr({"global_symbol": "read_scratch_unwritten", "tirx.noalias": True})
        out = T.match_buffer(o, (4,), "float32")
        scratch = T.alloc_buffer((4,), "float32")
        for tx in T.thread_binding(4, thread="threadIdx.x"):
            with T.sblock("copy"):
                i = T.axis.spatial(4, tx)
                out[i] = scratch[i]

    return func


def half_copy():
    """out = x in float16 (needs shader-f16 / cl_khr_fp16)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def func(x: T.handle, o: T.handle):
        T.func_attr({"global_symbol": "half_copy", "tirx.noalias": True})
        X = T.match_buffer(x, (8,), "float16")
        out = T.match_buffer(o, (8,), "float16")
        for tx in T.thread_binding(8, thread="threadIdx.x"):
            with T.sblock("copy"):
                i = T.axis.spatial(8, tx)
                out[i] = X[i] * T.float16(2)

    return func
