"""FuseDequantizeMatmul: matmul(x, dequantize(weight)) -> edgert's dequantizing matmul kernel.

Matches, in every Relax function, ``relax.matmul(x [.., K], w)`` where ``w`` is bound to
``call_tir(dequantize, [words, scale, bias])`` of a PrimFunc marked ``edgert.dequantize``
(``quantized_import.bind_quantized_weights``) over constants, and rewrites it into::

    call_tir(edgert_quant_matmul<bits>_K_N, [x, words_p, scale_p, bias_p])

the constants repacked into the kernel's column panels (``tir.quant_matmul``), once per weight
whatever the number of functions and matmuls that read it. ``x`` [b, m, K] is read as it is;
other ranks are reshaped to [1, rows, K] and back. CPU kernels take their panel width and row
blocking from ``knobs_for(K, N, bits)`` (the tuning database or the untuned default); GPU
kernels map a thread to an output column. A weight whose shape the kernel does not take (N not
a whole number of panels) keeps its dequantize call, which ``FoldConstant`` turns into fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax

from edgert.passes.pack_matmul_weights import rows_matmul
from edgert.passes.quantized_import import DEQUANTIZE_ATTR
from edgert.passes.tir.matmul import MatmulKnobs
from edgert.passes.tir.quant_matmul import (
    DEFAULT,
    GPU_PANEL,
    QuantizedWeight,
    pack_quantized,
    quant_matmul_tir,
)


def dequantize_calls(mod: tvm.IRModule, func: relax.Function) -> dict[relax.Var, tuple]:
    """var -> (bits, block, call) for every binding of ``func`` to a dequantize over
    constants."""
    found = {}
    for var, value in relax.analysis.get_var2val(func).items():
        if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir")):
            continue
        callee = mod[value.args[0]] if value.args[0] in mod.functions else None
        marker = callee.attrs.get(DEQUANTIZE_ATTR) if callee is not None and callee.attrs else None
        args = value.args[1].fields
        if marker is not None and all(isinstance(a, tvm.ir.expr.Constant) for a in args):
            found[var] = (int(marker[0]), int(marker[1]), value)
    return found


@tvm.transform.module_pass(opt_level=0, name="FuseDequantizeMatmul")
class FuseDequantizeMatmul:
    """See the module docstring."""

    def __init__(self, knobs_for: Callable[[int, int, int], MatmulKnobs] | None = None,
                 gpu: bool = False, index_dtype: str = "int64") -> None:
        self.knobs_for = knobs_for or (lambda k, n, bits: DEFAULT)
        self.gpu = gpu
        self.index_dtype = index_dtype

    def _knobs(self, k: int, n: int, bits: int) -> MatmulKnobs | None:
        if self.gpu:
            return MatmulKnobs(GPU_PANEL, 1, 1) if n % GPU_PANEL == 0 else None
        for knobs in (self.knobs_for(k, n, bits), DEFAULT, MatmulKnobs(1, 1, 1)):
            if knobs.fits(n):
                return knobs
        return None

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        names = [gv.name_hint for gv, func in mod.functions.items()
                 if isinstance(func, relax.Function)]
        found = {name: dequantize_calls(mod, mod[name]) for name in names}
        if not any(found.values()):
            return mod
        bb = relax.BlockBuilder(mod)
        kernels: dict[tuple, tuple] = {}  # (K, N, bits, block) -> (knobs, kernel)
        packed: dict[tuple, list] = {}  # the dequantize's constants -> packed constants
        for name in names:
            for bits, block, call in found[name].values():
                k, n = (int(s) for s in call.ty.shape)
                key = (k, n, bits, block)
                if key in kernels:
                    continue
                knobs = self._knobs(k, n, bits)
                kernel = None if knobs is None else bb.add_func(
                    quant_matmul_tir(k, n, bits, block, knobs, self.gpu, self.index_dtype),
                    f"edgert_quant_matmul{bits}_{k}_{n}")
                kernels[key] = (knobs, kernel)
        mod = bb.get()

        def packed_of(call: relax.Call, bits: int, block: int, bn: int) -> list:
            constants = tuple(call.args[1].fields)
            if constants not in packed:
                words, scale, bias = (c.value.numpy() for c in constants)
                weight = QuantizedWeight(bits, block, words, scale, bias)
                packed[constants] = [relax.const(a) for a in pack_quantized(weight, bn)]
            return packed[constants]

        def rewrite(call: relax.Call, found_call: tuple, emit) -> relax.Expr:
            bits, block, dequantize = found_call
            k, n = (int(s) for s in dequantize.ty.shape)
            knobs, kernel = kernels[(k, n, bits, block)]
            if kernel is None:
                return call
            weights = packed_of(dequantize, bits, block, knobs.bn)
            return rows_matmul(kernel, call.args[0], weights, k, n, emit)

        for name in names:
            if found[name]:
                mod[name] = _Rewriter(mod, found[name], rewrite).visit_expr(mod[name])
        return relax.transform.DeadCodeElimination()(mod)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Calls ``rewrite(call, found[w], emit)`` on every ``matmul(x, w)`` whose ``w`` is in
    ``found``."""

    def __init__(self, mod: tvm.IRModule, found: dict, rewrite) -> None:
        super().__init__(mod)
        self.found = found
        self.rewrite = rewrite

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == tvm.ir.Op.get("relax.matmul") and call.args[1] in self.found:
            return self.rewrite(call, self.found[call.args[1]], self.builder_.emit)
        return call
