"""NarrowToInt32: every int64 tensor of the Relax functions becomes int32 (WebGPU: WGSL has no
64-bit integers).

The imported graph carries int64 in a few places, all of them token ids or positions far below
2**31:

    input_ids, position_ids, logits_index params     -> int32 params
    where(less(x, 0), add(x, take(shape_to_tensor(s), i)), x)
        (the importer's Gather negative-index normalisation; edgert's runtime never passes a
         negative index, its input contract is 0 <= index < dim)
                                                      -> x
    astype(x, "int64"), topk(..., dtype="int64")      -> the same with "int32"
    int64 constants                                   -> int32 constants (range-checked)

Everything that consumes them (take, add, less, astype to float for the rotary angles) is
re-inferred on the int32 values. Afterwards no tensor of any Relax function is int64, or the
pass raises naming the op that still makes one. The TIR side (loop and buffer indices, which
are int64 by default) is narrowed after legalization by ``tirx.transform
.ForceNarrowIndexToInt32`` (see ``pipeline``).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir.expr import Constant

from edgert.errors import EdgertError

INT32_MAX = np.iinfo(np.int32).max


def _is_int64_tensor(ty) -> bool:
    return isinstance(ty, relax.TensorType) and ty.dtype == "int64"


def _narrowed(ty: relax.TensorType) -> relax.TensorType:
    if ty.shape is not None:
        return relax.TensorType(ty.shape, "int32", ty.vdevice)
    return relax.TensorType(None, "int32", ty.vdevice, ndim=ty.ndim)


def _op_name(expr) -> str:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return ""


class _Bindings:
    """The value bound to each variable of a module's Relax functions (before the rewrite)."""

    def __init__(self, mod: tvm.IRModule) -> None:
        self.values = {}
        for func in mod.functions.values():
            if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
                for block in func.body.blocks:
                    for binding in block.bindings:
                        if isinstance(binding, relax.VarBinding):
                            self.values[binding.var] = binding.value

    def value(self, expr):
        return self.values.get(expr, expr) if isinstance(expr, relax.Var) else expr

    def normalised_index(self, call: relax.Call):
        """``x`` when ``call`` is where(less(x, 0), add(x, take(shape_to_tensor(.), i)), x)."""
        if _op_name(call) != "relax.where":
            return None
        cond, wrapped, index = call.args
        less, add = self.value(cond), self.value(wrapped)
        if _op_name(less) != "relax.less" or _op_name(add) != "relax.add":
            return None
        zero = less.args[1]
        if not (less.args[0].same_as(index) and add.args[0].same_as(index)
                and isinstance(zero, Constant) and zero.value.numpy().item() == 0):
            return None
        dim = self.value(add.args[1])
        if _op_name(dim) != "relax.take" or _op_name(self.value(dim.args[0])) != \
                "relax.shape_to_tensor":
            return None
        return index


@relax.expr_functor.mutator
class _DropIndexNormalisation(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.bindings = _Bindings(mod)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        index = self.bindings.normalised_index(call)
        return self.visit_expr(index) if index is not None else super().visit_call_(call)


@relax.expr_functor.mutator
class _Narrower(relax.PyExprMutator):

    def _retyped(self, var: relax.Var, make) -> relax.Var:
        if not _is_int64_tensor(var.ty):
            return var
        new = make(var.name, _narrowed(var.ty))
        self.set_var_remap(var, new)
        return new

    def visit_var_def_(self, var: relax.Var) -> relax.Var:
        return self._retyped(var, relax.Var)

    def visit_dataflow_var_def_(self, var: relax.DataflowVar) -> relax.Var:
        return self._retyped(var, relax.DataflowVar)

    def visit_generic_const_(self, const: Constant) -> relax.Expr:
        if const.value.dtype != "int64":
            return const
        values = const.value.numpy()
        if values.size and np.abs(values).max() > INT32_MAX:
            raise EdgertError(f"an int64 constant of the graph ({values.max()}) does not fit in "
                              "int32; this target has no 64-bit integers")
        return relax.const(values.astype(np.int32), "int32")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        new = super().visit_call_(call)
        name = _op_name(new)
        if name == "relax.astype" and new.attrs.dtype == "int64":
            return relax.op.astype(new.args[0], "int32")
        if name == "relax.topk" and new.attrs.dtype == "int64":
            a = new.attrs
            return relax.op.topk(new.args[0], a.k, a.axis, a.ret_type, a.largest, "int32")
        return new

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        params = [self.visit_var_def(p) for p in func.params]
        body = self.visit_with_new_scope(func.body)
        return relax.Function(params, body, None, func.is_pure, func.attrs, func.span)


def _rewrite_functions(mod: tvm.IRModule, mutator) -> tvm.IRModule:
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    mod = relax.transform.CanonicalizeBindings()(mutator.builder_.get())  # x = y aliases
    return relax.transform.DeadCodeElimination()(mod)


def int64_values(func: relax.Function) -> list[str]:
    """What still makes an int64 tensor in ``func``: param names and the ops of bindings."""
    found = [f"param {p.name}" for p in func.params if _is_int64_tensor(p.ty)]
    for block in func.body.blocks:
        for binding in block.bindings:
            if _is_int64_tensor(binding.var.ty):
                found.append(_op_name(binding.value) or type(binding.value).__name__)
    return found


@tvm.transform.module_pass(opt_level=0, name="NarrowToInt32")
class NarrowToInt32:
    """Rewrite every Relax function of the module so that no tensor is int64 (see the module
    docstring); raises EdgertError naming what could not be narrowed."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        for mutator in (_DropIndexNormalisation, _Narrower):
            mod = _rewrite_functions(mod, mutator(mod))
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                left = int64_values(func)
                if left:
                    raise EdgertError(f"{gvar.name_hint} still has int64 tensors after narrowing "
                                      f"({', '.join(sorted(set(left)))}); this target has no "
                                      "64-bit integers")
        return mod


EDGERT_KERNEL_PREFIX = "edgert_"


@tvm.transform.module_pass(opt_level=0, name="NarrowGenericIndices")
class NarrowGenericIndices:
    """``tirx.transform.ForceNarrowIndexToInt32`` on the legalized (generic) PrimFuncs: their
    loop and buffer indices are int64 by default. edgert's own kernels (``edgert_*``) are left
    alone: they are written so that the target's build narrows them (their explicit int32 <->
    index casts would otherwise mismatch), and their tests check the WebGPU source for i64."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        generic = {gv: f for gv, f in mod.functions.items()
                   if isinstance(f, tirx.PrimFunc)
                   and not gv.name_hint.startswith(EDGERT_KERNEL_PREFIX)}
        if not generic:
            return mod
        narrowed = tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule(generic))
        mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
        for gv, func in narrowed.functions.items():
            mod.update_func(mod.get_global_var(gv.name_hint), func)
        return mod
