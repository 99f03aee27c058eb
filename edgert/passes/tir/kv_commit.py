"""Medusa's commit on a device-resident KV cache: keep the accepted tree entries, in place.

After a tree step the N+1 verified entries sit at ``[length, length + N+1)`` of every layer
buffer; the accepted path is ``offsets`` (ascending node ids, root first). The commit moves
entry ``length + offsets[t]`` to ``length + t`` for every t, in every key and value buffer:

    cache_b [Hkv, C, D]  (b = 0 .. 2L-1: key_0, value_0, key_1, ...)
    offsets [n] int64    ascending, offsets[t] >= t
    length  int64        committed entries before this step
    (int32 both, and every index, for targets without 64-bit integers: WebGPU)

Source and destination regions overlap (destination <= source), so the copy runs forward in t:
entry t is written only after every entry it could overwrite (``offsets[t'] == t`` for some
t' < t) was read. GPU: a block per buffer (or a part of one), a thread per (head, element),
each thread walking t in order (no thread reads what another writes); CPU: one serial pass
(a decode step moves a handful of rows: a thread-pool launch would cost more than the copy).
All 2L buffers go through one call (one kernel launch on a GPU).

The function is built with TVM's IR builder rather than TVMScript: its parameter list (one
buffer per layer key/value) depends on the model.
"""

from __future__ import annotations

import numpy as np

from edgert.artifact.tvm_build import KV_COMMIT_FUNCTION as FUNCTION

MAX_THREADS = 1024  # CUDA's threads per block


def kv_commit_reference(buffers: list[np.ndarray], offsets: np.ndarray, length: int) -> None:
    """NumPy reference, in place: buffers [Hkv, C, D] each."""
    offsets = np.asarray(offsets, dtype=np.int64)
    for buf in buffers:
        for t, off in enumerate(offsets):
            buf[:, length + t] = buf[:, length + off]


def _gpu_split(lanes: int) -> tuple[int, int]:
    """(parts, threads): a buffer's Hkv x D lanes as ``parts`` blocks of ``threads``."""
    for parts in range(1, lanes + 1):
        if lanes % parts == 0 and lanes // parts <= MAX_THREADS:
            return parts, lanes // parts
    raise AssertionError("unreachable: parts == lanes gives one thread per block")


def kv_commit_tir(num_buffers: int, num_kv_heads: int, head_dim: int, dtype: str = "float32",
                  gpu: bool = False, index_dtype: str = "int64"):
    """The ``edgert_kv_commit`` PrimFunc over ``num_buffers`` cache buffers [Hkv, cap, D]
    (cap symbolic), then offsets [n] and length, both ``index_dtype``."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    hkv, d = num_kv_heads, head_dim
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(FUNCTION)
            T.func_attr({"tirx.noalias": True, "global_symbol": FUNCTION})
            cap = tirx.Var("cap", index_dtype)
            n = tirx.Var("n", index_dtype)
            buffers = [T.match_buffer(T.arg(f"cache_{b}", T.handle()), (hkv, cap, d), dtype)
                       for b in range(num_buffers)]
            offsets = T.match_buffer(T.arg("offsets", T.handle()), (n,), index_dtype)
            length = T.arg("length", tirx.Var("length", index_dtype))
            if gpu:
                parts, threads = _gpu_split(hkv * d)
                with T.thread_binding(num_buffers * parts, thread="blockIdx.x") as block:
                    with T.thread_binding(threads, thread="threadIdx.x") as lane:
                        hx = (block % parts) * threads + lane
                        h, x = hx // d, hx % d
                        for b, buf in enumerate(buffers):  # uniform per block: no divergence
                            with T.If(block // parts == b):
                                with T.Then():
                                    with T.serial(n) as t:
                                        T.buffer_store(buf, buf[h, length + offsets[t], x],
                                                       [h, length + t, x])
            else:
                for buf in buffers:
                    with T.serial(hkv) as h:
                        with T.serial(n) as t:
                            with T.vectorized(d) as x:
                                T.buffer_store(buf, buf[h, length + offsets[t], x],
                                               [h, length + t, x])
    return ib.get()


def kv_commit_module(num_buffers: int, num_kv_heads: int, head_dim: int, dtype: str = "float32",
                     gpu: bool = False, index_dtype: str = "int64"):
    import tvm

    func = kv_commit_tir(num_buffers, num_kv_heads, head_dim, dtype, gpu, index_dtype)
    return tvm.IRModule({FUNCTION: func})


def build_kv_commit(spec, target, index_dtype: str = "int64"):
    """Build the commit kernel for a :class:`~edgert.artifact.manifest.KVCacheSpec` on ``target`` (a
    ``tvm.target.Target``; GPU targets need their host set). Returns the runtime module."""
    import tvm

    gpu = target.kind.name != "llvm"
    mod = kv_commit_module(2 * spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype,
                           gpu, index_dtype)
    return tvm.tirx.build(mod, target)


def build_kv_commit_library(spec, target: str = "llvm"):
    """``build_kv_commit`` for a target name ("llvm", "cuda", ...); tests and device checks
    build it here, the TVM backend loads the one ``edgert compile`` wrote (``kv_commit.so``)."""
    from edgert.passes.targets import resolve_target

    _, tvm_target = resolve_target(target)
    return build_kv_commit(spec, tvm_target)
