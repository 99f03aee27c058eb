"""LowerTopK: ``relax.topk`` over the last axis -> edgert's insertion top-k kernel.

Matches every ``topk(x [..., V], k, axis=-1, ret_type="both", largest=True)`` (the Medusa heads'
candidates) and rewrites it into::

    x2    = reshape(x, [rows, V])                          rows = prod(x.shape[:-1])
    pair  = call_tir(edgert_topk, [x2]) -> ([rows, k] float32, [rows, k] dtype)
    (reshape(pair[0], [..., k]), reshape(pair[1], [..., k]))

Used where TVM's generic GPU top-k cannot build (WebGPU: it needs blockIdx.z) or would sort a
vocab-long row to keep a handful of entries; see ``kernels.topk``. Other top-k forms are left
to TVM's own lowering.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from edgert.passes.tir.topk import topk_tir


def _is_last_axis(call: relax.Call) -> bool:
    ndim = call.args[0].ty.ndim
    return int(call.attrs.axis) in (-1, ndim - 1)


@tvm.transform.module_pass(opt_level=0, name="LowerTopK")
class LowerTopK:
    """Rewrite the largest-first, last-axis top-k calls of every Relax function.

    Parameters
    ----------
    gpu : emit the kernel's GPU loop mapping (a block per row) instead of the CPU one.
    """

    def __init__(self, gpu: bool = True) -> None:
        self.gpu = gpu

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        bb = relax.BlockBuilder(mod)
        kernels: dict[tuple[int, str], relax.GlobalVar] = {}
        pattern = is_op("relax.topk")(wildcard())

        def kernel(k: int, dtype: str) -> relax.GlobalVar:
            if (k, dtype) not in kernels:
                name = "edgert_topk" if not kernels else f"edgert_topk_{k}_{dtype}"
                kernels[(k, dtype)] = bb.add_func(
                    topk_tir(k, self.gpu, dtype).with_attr("global_symbol", name), name)
            return kernels[(k, dtype)]

        def rewrite(call, matched):
            a = call.attrs
            if a.ret_type != "both" or not a.largest or not _is_last_axis(call):
                return call
            x = call.args[0]
            shape = list(x.ty.shape)
            k, dtype = int(a.k), str(a.dtype)
            rows = 1
            for dim in shape[:-1]:
                rows = rows * dim
            pair = relax.call_tir(kernel(k, dtype), [relax.op.reshape(x, [rows, shape[-1]])],
                                  [relax.TensorType([rows, k], "float32"),
                                   relax.TensorType([rows, k], dtype)])
            out_shape = shape[:-1] + [k]
            return relax.Tuple([relax.op.reshape(relax.TupleGetItem(pair, 0), out_shape),
                                relax.op.reshape(relax.TupleGetItem(pair, 1), out_shape)])

        rewritten = {gvar: rewrite_call(pattern, rewrite, func)
                     for gvar, func in mod.functions.items() if isinstance(func, relax.Function)}
        out = bb.get()  # the original functions plus the kernels the rewrites added
        for gvar, func in rewritten.items():
            out[gvar] = func
        return out
