"""PackMatmulWeights: matmuls against constant weights -> edgert's panel-packed kernel (CPU).

Matches every ``relax.matmul(x [.., K], W)`` whose W is a constant [K, N] (the projections, the
MLP, the lm_head) and rewrites it into::

    call_tir(edgert_matmul_K_N, [x, Wp])              x: [b, m, K] as it is (other ranks are
                                                      reshaped to [1, rows, K] and back)
                                                      Wp: W packed [N / bn, K, bn], a constant

A ``relax.take(W, ids, axis=1)`` of the same constant (SmolLM2's tied embedding reads the
lm_head weight) becomes ``call_tir(edgert_take_K_N, [Wp, ids])``, so the weight is stored once,
packed. The panel width and row blocking come from ``knobs_for(K, N)`` (the tuning database
or the untuned default); see ``kernels.matmul``.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from edgert.passes.tir.matmul import (
    DEFAULT,
    MatmulKnobs,
    pack_weight,
    packed_matmul_tir,
    packed_take_tir,
)


def _static_shape(expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None:
        return None
    try:
        return [int(s) for s in shape]
    except TypeError:
        return None


def constant_matmul_shapes(func: relax.Function) -> set[tuple[int, int]]:
    """(K, N) of every matmul against a constant 2-D weight in ``func``."""
    shapes = set()
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                    and value.op.name == "relax.matmul"
                    and isinstance(value.args[1], tvm.ir.expr.Constant)
                    and value.args[1].value.dtype == "float32"
                    and len(value.args[1].value.shape) == 2):
                shapes.add(tuple(int(s) for s in value.args[1].value.shape))
    return shapes


@tvm.transform.module_pass(opt_level=0, name="PackMatmulWeights")
class PackMatmulWeights:
    """Rewrite the constant-weight matmuls (and takes of those weights) of every Relax function
    of the module into packed kernels; a weight used by several functions is packed once and
    shared. ``knobs_for(K, N)`` picks each shape's schedule (default: untuned)."""

    def __init__(self, knobs_for: Callable[[int, int], MatmulKnobs] | None = None) -> None:
        self.knobs_for = knobs_for or (lambda k, n: DEFAULT)

    def _knobs(self, k: int, n: int) -> MatmulKnobs:
        knobs = self.knobs_for(k, n)
        return knobs if knobs.fits(n) else DEFAULT if DEFAULT.fits(n) else MatmulKnobs(1, 1)

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        names = [gv.name_hint for gv, func in mod.functions.items()
                 if isinstance(func, relax.Function)]
        shapes = set()
        for name in names:
            shapes |= constant_matmul_shapes(mod[name])
        bb = relax.BlockBuilder(mod)
        kernels = {}
        for k, n in sorted(shapes):
            knobs = self._knobs(k, n)
            matmul = bb.add_func(packed_matmul_tir(k, n, knobs), f"edgert_matmul_{k}_{n}")
            take = bb.add_func(packed_take_tir(k, n, knobs.bn), f"edgert_take_{k}_{n}")
            kernels[(k, n)] = (knobs, matmul, take)
        if not kernels:
            return mod
        mod = bb.get()
        packed = {}  # weight constant -> its packed constant (one per weight, all functions)

        def packed_of(weight: tvm.ir.expr.Constant):
            if weight not in packed:
                knobs = kernels[tuple(int(s) for s in weight.value.shape)][0]
                packed[weight] = relax.const(pack_weight(weight.value.numpy(), knobs.bn))
            return packed[weight]

        x, w = wildcard(), is_const()
        matmul = is_op("relax.matmul")(x, w)
        ids = wildcard()
        take = is_op("relax.take")(w, ids)

        def rewrite_matmul(expr, matched):
            weight = matched[w]
            shape = tuple(int(s) for s in weight.value.shape) if weight.value.ndim == 2 else None
            if shape not in kernels or weight.value.dtype != "float32":
                return expr
            k, n = shape
            return rows_matmul(kernels[shape][1], matched[x], [packed_of(weight)], k, n)

        def rewrite_take(expr, matched):
            weight = matched[w]
            shape = tuple(int(s) for s in weight.value.shape) if weight.value.ndim == 2 else None
            index = matched[ids]
            if (shape not in kernels or int(expr.attrs.axis) != 1
                    or len(index.ty.shape) != 1 or index.ty.dtype != "int64"):
                return expr
            k, _ = shape
            return relax.call_tir(kernels[shape][2], [packed_of(weight), index],
                                  relax.TensorType([k, index.ty.shape[0]], "float32"))

        for name in names:  # main, and prefill_dhsa when the artifact has DHSA
            body = rewrite_call(matmul, rewrite_matmul, mod[name])
            mod[name] = rewrite_call(take, rewrite_take, body)
        mod = relax.transform.DeadCodeElimination()(mod)
        return mod


def rows_matmul(kernel: tvm.ir.GlobalVar, x: relax.Expr, weights: list, k: int, n: int,
                emit: Callable[[relax.Expr], relax.Expr] = lambda e: e) -> relax.Expr:
    """``call_tir(kernel, [x, *weights])`` for a kernel taking x as [b, m, K] rows and giving
    [b, m, N]: x of another rank is reshaped to [1, rows, K] and the result back (``emit``
    binds the intermediate expressions where the caller needs it)."""
    lead = list(x.ty.shape)[:-1]
    if len(lead) == 2:  # [b, m, K]: the kernel reads it as it is
        return relax.call_tir(kernel, [x, *weights], relax.TensorType(lead + [n], "float32"))
    rows = 1
    for dim in lead:
        rows = rows * dim
    flat = emit(relax.op.reshape(x, [1, -1, k]))
    out = emit(relax.call_tir(kernel, [flat, *weights],
                              relax.TensorType([1, rows, n], "float32")))
    return relax.op.reshape(out, lead + [n])
