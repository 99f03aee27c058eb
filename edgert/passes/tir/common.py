"""Pieces the TIR kernels share: loop mappings, flat work spaces, index dtypes, constants.

The attention, DHSA and top-k kernels are each one TVMScript template with two loop mappings:
GPU (a blockIdx.x loop over a threadIdx.x loop) and CPU (a parallel loop over a serial one).
A stage's work items are laid out flat, ``item = block * lanes + lane`` over
``ceildiv(items, lanes) x lanes``, its sblock axes recovered from ``item`` and the padding of
the last block guarded off.

The helpers build loop frames and PrimExprs while a PrimFunc is parsed, so they import TVM
only when called (this module imports without TVM).
"""

from __future__ import annotations

import functools
import operator

MASKED = -1e30  # online-softmax start and the score of a masked key: finite, so no inf - inf
NEGATIVE_INFINITY_BITS = 0xFF800000  # float32 -inf
GPU_LANES = 64  # threads per GPU block of a flat stage (the DHSA kernels)
DOT_LANES = 8  # partial sums of a q.k dot product (when head_dim is a multiple)


def loop_mapping(gpu: bool):
    """Loop constructors of the outer and inner loop of a flat work space.

    Parameters
    ----------
    gpu : bool
        GPU mapping (blockIdx.x x threadIdx.x) or CPU mapping (parallel x serial).

    Returns
    -------
    tuple of callable
        ``(outer, inner)``, each taking an extent and returning a TIR for-loop frame.
    """
    from tvm.script import tirx as T

    if gpu:
        return (lambda e: T.thread_binding(e, thread="blockIdx.x"),
                lambda e: T.thread_binding(e, thread="threadIdx.x"))
    return (lambda e: T.parallel(e), lambda e: T.serial(e))


def vector_loop(gpu: bool):
    """Loop constructor of a SIMD loop (over head_dim or dot-product lanes).

    Parameters
    ----------
    gpu : bool
        GPU: a serial loop per thread (CUDA C has no float32x16); CPU: a vectorized loop.

    Returns
    -------
    callable
        Takes an extent, returns a TIR for-loop frame.
    """
    from tvm.script import tirx as T

    return (lambda e: T.serial(e)) if gpu else (lambda e: T.vectorized(e))


def stage_mapping(gpu: bool):
    """The loop mapping of a kernel made of flat stages (the DHSA kernels).

    Parameters
    ----------
    gpu : bool
        GPU: ``GPU_LANES`` threads per block, a thread per work item; CPU: one parallel loop
        over the work items (a unit inner loop).

    Returns
    -------
    tuple
        ``(outer, inner, vector, lanes)``: the loop constructors of ``loop_mapping`` and
        ``vector_loop``, and the extent of the inner loop.
    """
    return (*loop_mapping(gpu), vector_loop(gpu), GPU_LANES if gpu else 1)


def dot_lanes_for(head_dim: int) -> int:
    """Partial sums of a dot product over ``head_dim``.

    Returns
    -------
    int
        ``DOT_LANES`` when it divides ``head_dim``, else 1 (a scalar dot product).
    """
    return DOT_LANES if head_dim % DOT_LANES == 0 else 1


def flat_axes(item, *extents):
    """Declare the sblock's spatial axes of a flat work item (call inside ``T.sblock``).

    Parameters
    ----------
    item : PrimExpr
        The flat work-item index, ``block * lanes + lane``.
    *extents : int or PrimExpr
        The extents of the axes, outermost first (row-major over ``item``).

    Returns
    -------
    Var or tuple of Var
        The axis variables (the variable itself for one extent). The sblock also gets the
        predicate ``item < prod(extents)``, which masks the last block's padding.
    """
    from tvm.script import tirx as T

    axes = []
    for i, extent in enumerate(extents):
        inner = extents[i + 1:]
        value = item // functools.reduce(operator.mul, inner) if inner else item
        axes.append(T.axis.spatial(extent, value % extent if i else value))
    T.where(item < functools.reduce(operator.mul, extents))
    return axes[0] if len(axes) == 1 else tuple(axes)


def negative_infinity():
    """float32 -inf as a PrimExpr every target prints validly (call while parsing).

    TVM prints a float -inf constant as ``-inff`` in WGSL, which has no infinity literal (naga
    rejects the shader); a reinterpret of its bits prints as ``bitcast<f32>(4286578688u)``
    (OpenCL/CUDA: a pointer cast, Metal: ``as_type<float>``, llvm: a constant), the same value
    everywhere.

    Returns
    -------
    PrimExpr
        ``T.reinterpret("float32", T.uint32(0xFF800000))``.
    """
    from tvm.script import tirx as T

    return T.reinterpret("float32", T.uint32(NEGATIVE_INFINITY_BITS))


def index_type(index_dtype: str):
    """The index type of a kernel with symbolic lengths.

    Parameters
    ----------
    index_dtype : str
        ``"int64"``, or ``"int32"`` for targets without 64-bit integers (WebGPU).

    Returns
    -------
    tuple of callable
        ``(length, index)``: ``length()`` declares a symbolic length of ``index_dtype``;
        ``index(value)`` casts an int32 buffer value to an index.

    Raises
    ------
    ValueError
        If ``index_dtype`` is neither int32 nor int64.
    """
    from tvm.script import tirx as T

    if index_dtype not in ("int32", "int64"):
        raise ValueError(f"index_dtype must be int32 or int64, not {index_dtype}")
    length = T.int32 if index_dtype == "int32" else T.int64
    return length, lambda value: T.Cast(index_dtype, value)


def softmax_state(heads: int, dim: int):
    """Macros that start and finish the online-softmax state of ``heads`` query heads.

    Parameters
    ----------
    heads : int
        Query heads one work item handles.
    dim : int
        head_dim.

    Returns
    -------
    tuple of T.macro
        ``(init, store)``: ``init(m, total, acc)`` sets the running max to ``MASKED`` and the
        sum and accumulator [heads, dim] to 0; ``store(out, row, head0, acc, total)`` writes
        ``out[row, head0 + hh] = acc[hh] / total[hh]`` for every head hh.
    """
    from tvm.script import tirx as T

    @T.macro
    def init(m, total, acc):
        for hh in range(heads):
            m[hh] = T.float32(MASKED)
            total[hh] = T.float32(0)
            for x in range(dim):
                acc[hh, x] = T.float32(0)

    @T.macro
    def store(out, row, head0, acc, total):
        for hh in range(heads):
            for x in range(dim):
                out[row, head0 + hh, x] = acc[hh, x] / total[hh]

    return init, store
