"""FuseParallelMatmuls: matmuls of one input against several constant weights -> one matmul.

Matches, in every Relax function, the bindings ``y_i = matmul(x, W_i)`` that share the same
``x`` and whose ``W_i`` are 2-D float32 constants with the same K (a layer's q/k/v projections,
the MLP's gate and up projections) and rewrites them into::

    y   = matmul(x, W)                 W = concat(W_0, W_1, ...) along N, a constant
    y_i = strided_slice(y, last axis, [n_i, n_i + N_i])

On a CPU decode step every matmul is a stream over its weights: one wider stream keeps the
memory busier than three short ones, and it costs one thread-pool launch instead of three
(TVM's ~10 us each). TVM's CombineParallelMatmul does the same for weight *parameters*; the
artifact's weights are constants (``keep_params_in_input=False``), which it does not match.
Run before PackMatmulWeights, which packs the concatenated weight once.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def decoder_matmul_shapes(config) -> list[tuple[int, int]]:
    """(K, N) of every weight matmul of a Llama decoder layer and its head after this pass:
    q/k/v as one [H, (Hq + 2 Hkv) D], gate/up as one [H, 2 I], o_proj, down_proj and the
    vocab projection. The tuner measures these shapes (``passes.tuning.tunable``)."""
    h, d = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    return [(h, qkv), (config.num_attention_heads * d, h), (h, 2 * config.intermediate_size),
            (config.intermediate_size, h), (h, config.vocab_size)]


def _constant_weight(call) -> np.ndarray | None:
    """W of ``matmul(x, W)`` when W is a 2-D float32 constant, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
            and call.op.name == "relax.matmul"):
        return None
    weight = call.args[1]
    if not isinstance(weight, tvm.ir.expr.Constant):
        return None
    value = weight.value
    if value.dtype != "float32" or len(value.shape) != 2:
        return None
    return value


def parallel_groups(func: relax.Function) -> list[list[relax.Var]]:
    """The bound vars of matmuls that share an input and a constant weight's K, in binding
    order, for every group of two or more."""
    groups: dict[tuple, list[relax.Var]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            weight = _constant_weight(binding.value)
            if weight is not None and isinstance(binding.value.args[0], relax.Var):
                key = (binding.value.args[0], int(weight.shape[0]))
                groups.setdefault(key, []).append(binding.var)
    return [members for members in groups.values() if len(members) > 1]


@relax.expr_functor.mutator
class _Fuser(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.first: dict[relax.Var, list[relax.Var]] = {}  # group's first var -> members
        self.values: dict[relax.Var, relax.Call] = {}
        self.done: set[relax.Var] = set()

    def start(self, func: relax.Function) -> None:
        self.first, self.values, self.done = {}, {}, set()
        for block in func.body.blocks:
            for binding in block.bindings:
                self.values[binding.var] = binding.value
        for members in parallel_groups(func):
            self.first[members[0]] = members

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.done:
            return  # bound when its group's first member was
        members = self.first.get(binding.var)
        if members is None:
            super().visit_var_binding_(binding)
            return
        x = self.visit_expr(self.values[binding.var].args[0])
        weights = [_constant_weight(self.values[v]).numpy() for v in members]
        fused = self.builder_.emit(relax.op.matmul(x, relax.const(np.concatenate(weights, 1))))
        start, last = 0, fused.ty.ndim - 1
        for var, weight in zip(members, weights):
            width = weight.shape[1]
            part = relax.op.strided_slice(fused, axes=[last], begin=[start], end=[start + width])
            new = (self.builder_.emit_output(part) if not isinstance(var, relax.DataflowVar)
                   else self.builder_.emit(part))
            self.set_var_remap(var, new)
            self.done.add(var)
            start += width


@tvm.transform.module_pass(opt_level=0, name="FuseParallelMatmuls")
class FuseParallelMatmuls:
    """Fuse the parallel constant-weight matmuls of every Relax function (see the module
    docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        fuser = _Fuser(mod)
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function) and parallel_groups(func):
                fuser.start(func)
                fuser.builder_.update_func(gvar, fuser.visit_expr(func))
        return fuser.builder_.get()
