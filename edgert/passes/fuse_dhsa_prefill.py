"""FuseDHSAPrefill: a second entry function, ``prefill_dhsa``, for DHSA sparse prefill.

Runs on the imported portable module before FuseTreeAttention and leaves ``main`` alone. It
copies ``main`` and rewrites, in the copy, every layer's portable attention core (the same
match as FuseTreeAttention: ``core_pattern``, keys/values from ``Concat(past_key_i, K_new)``).
Layer i's core becomes::

    k_i   = K_new as [T,Hkv,D];  v_i = V_new as [T,Hkv,D];  q_i = Q as [T,Hq,D]
    k_cache_i = call_tir_inplace(edgert_kv_append, [k_cache_i, k_i, 0])   (past = 0)
    v_cache_i = call_tir_inplace(edgert_kv_append, [v_cache_i, v_i, 0])
    i <  boundary_layer: out = call_tir(edgert_tree_attention, [q_i, k_cache_i, v_cache_i,
                                                               tree_order, 0])   (dense)
    i == boundary_layer: starts = call_tir(edgert_dhsa_boundaries, [q_i, k_i, fixed_chunk])
    i >= boundary_layer: out = call_tir(edgert_dhsa_attention, [q_i, k_i, v_i, starts])
                         (edgert_dhsa_attention_early, its budget early_budget, for the
                         early_layers layers from boundary_layer on)
    -> reshape [1,T,Hq*D]

``starts`` is bound once, at the boundary layer, and read by every later layer (the chunk
boundaries are shared, as in ``edgert.dhsa.reference`` and ``model.dhsa.onnx``). The sparse
layers attend over the new K/V directly, not read back from the cache. (A boundary layer past
the last layer makes every layer dense, as the ONNX graph does.)

Signature: ``(input_ids [1,T], position_ids [1,T], tree_order [T,2] int32, logits_index [n],
cache_key_0, cache_value_0, ... [Hkv,C,D], fixed_chunk int32)``: the prompt goes into an empty
cache, written in place at [0, T); ``tree_order`` is the causal order (read by the dense layers
only); ``fixed_chunk`` 0 = dynamic boundaries, N > 0 = N-token chunks. It returns ``(logits,
hidden, cache_key_0, cache_value_0, ...[, features])``: the updated caches (the same buffers,
written in place) replace main's ``present_*`` outputs, so that no dead-code elimination drops
the cache writes of the sparse layers, whose attention does not read the cache; ``features``
(every row's hidden state, artifacts with a draft layer) passes through.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from edgert.artifact.tvm_build import DHSA_FUNCTION
from edgert.dhsa.params import DHSAParams
from edgert.errors import BackendError, EdgertError
from edgert.passes.fuse_tree_attention import _Bindings, core_pattern
from edgert.passes.tir.dhsa_attention import DHSAKnobs, dhsa_attention_tir
from edgert.passes.tir.dhsa_boundaries import dhsa_boundaries_tir
from edgert.passes.tir.tree_attention import (
    DEFAULT_KNOBS,
    TreeAttentionKnobs,
    kv_append_tir,
    tree_attention_tir,
)

FUNCTION = DHSA_FUNCTION
_PAST = re.compile(r"past_(key|value)_(\d+)")


def check_supported(params: DHSAParams) -> None:
    """Refuse, in one line, DHSA settings the TVM kernels do not compute."""
    if params.per_kv_head:
        raise BackendError("this artifact's DHSA selects keys per KV head (dhsa.per_kv_head=1); "
                           "the TVM DHSA kernel selects one set for all heads: re-export with "
                           "`--dhsa per_kv_head=0` (or `--no-dhsa`) to compile it")


@tvm.transform.module_pass(opt_level=0, name="FuseDHSAPrefill")
class FuseDHSAPrefill:
    """Add ``prefill_dhsa`` (see the module docstring) next to the imported ``main``.

    Parameters
    ----------
    num_heads, num_kv_heads, head_dim : the model's attention shape.
    params : the artifact's DHSA parameters (compiled into the kernels).
    gpu : emit the GPU loop mappings of the kernels instead of the CPU ones.
    knobs : the tree-attention kernel's schedule; pass FuseTreeAttention's, so both functions
        share one ``edgert_tree_attention``.
    dhsa_knobs : the DHSA kernel's schedule (the tuning database's best, or untuned).
    index_dtype : the DHSA kernels' index type ("int32" for targets without 64-bit integers).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, params: DHSAParams,
                 gpu: bool = False, knobs: TreeAttentionKnobs = DEFAULT_KNOBS,
                 dhsa_knobs: DHSAKnobs = DHSAKnobs(), index_dtype: str = "int64") -> None:
        check_supported(params)
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.params = params
        self.gpu = gpu
        self.knobs = knobs
        self.dhsa_knobs = dhsa_knobs
        self.index_dtype = index_dtype

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        h, hkv, d, gpu = self.h, self.hkv, self.d, self.gpu
        bb = relax.BlockBuilder(mod)
        kernels = {
            "attention": bb.add_func(tree_attention_tir(h, hkv, d, gpu, self.knobs),
                                     "edgert_tree_attention"),
            "append": bb.add_func(kv_append_tir(hkv, d, gpu), "edgert_kv_append"),
            "boundaries": bb.add_func(dhsa_boundaries_tir(h, hkv, d, self.params, gpu,
                                                          self.index_dtype),
                                      "edgert_dhsa_boundaries"),
            "sparse": bb.add_func(dhsa_attention_tir(h, hkv, d, self.params, gpu,
                                                     self.dhsa_knobs, self.index_dtype),
                                  "edgert_dhsa_attention"),
        }
        if self.params.is_early(self.params.boundary_layer):  # wider layers: own budget
            early = self.params.for_layer(self.params.boundary_layer)
            name = "edgert_dhsa_attention_early"
            kernels["sparse_early"] = bb.add_func(
                dhsa_attention_tir(h, hkv, d, early, gpu, self.dhsa_knobs,
                                   self.index_dtype).with_attr("global_symbol", name), name)
        mod = bb.get()
        func = relax.utils.copy_with_new_vars(mod["main"])  # main keeps its own vars
        params = {p.name: p for p in func.params}
        seq_len = params["input_ids"].ty.shape[1]
        cap = tirx.Var("capacity", "int64")
        cache_ty = relax.TensorType([hkv, cap, d], "float32")
        caches = {}  # past_key_i param -> cache_key_i param
        for name, param in params.items():
            if _PAST.fullmatch(name):
                caches[param] = relax.Var(name.replace("past_", "cache_", 1), cache_ty)
        num_layers = len(caches) // 2
        tree_order = relax.Var("tree_order", relax.TensorType([seq_len, 2], "int32"))
        fixed_chunk = relax.Var("fixed_chunk", tvm.ir.PrimType("int32"))
        rewriter = _PrefillRewriter(mod, self, func, kernels, caches, tree_order, fixed_chunk,
                                    seq_len)
        body = rewriter.visit_expr(func).body
        if len(rewriter.layers) != num_layers:
            raise EdgertError(f"FuseDHSAPrefill rewrote {len(rewriter.layers)} attention cores "
                              f"but the model has {num_layers} layers")
        if not rewriter.outputs_rewritten:
            raise EdgertError("main does not return a tuple (logits, hidden, present K/V) bound "
                              "in its body; FuseDHSAPrefill cannot return the updated caches")
        new_params = [tree_order if p.name == "tree_mask" else caches.get(p, p)
                      for p in func.params] + [fixed_chunk]
        new_func = relax.Function(new_params, body, None, func.is_pure, func.attrs)
        new_func = relax.analysis.remove_all_unused(new_func)
        new_func = new_func.with_attrs({"global_symbol": FUNCTION,
                                        "num_input": len(new_params)})
        bb = relax.BlockBuilder(mod)
        bb.add_func(new_func, FUNCTION)
        return bb.get()

    def kv_rows(self, new_bnsh, seq_len):
        """[1,Hkv,T,D] -> [T,Hkv,D] (the kernels' layout)."""
        return relax.op.reshape(relax.op.permute_dims(new_bnsh, [0, 2, 1, 3]),
                                [seq_len, self.hkv, self.d])


@mutator
class _PrefillRewriter(PyExprMutator):
    """Re-emits ``main``'s bindings, replacing each attention core in binding order (= layer
    order: layer i's query depends on layer i-1's output)."""

    def __init__(self, mod, fuse: FuseDHSAPrefill, func, kernels, caches, tree_order,
                 fixed_chunk, seq_len) -> None:
        super().__init__(mod)
        self.fuse = fuse
        self.var2val = relax.analysis.get_var2val(func)
        # the matcher hands back bound values (it looks through variables); their variables
        self.var_of = {value: var for var, value in self.var2val.items()}
        self.bindings = _Bindings(func)
        self.root, self.query, self.keys, self.values = core_pattern()
        self.kernels = kernels
        self.caches = caches
        self.tree_order = tree_order
        self.fixed_chunk = fixed_chunk
        self.seq_len = seq_len
        self.output = func.body.body
        self.outputs_rewritten = False
        self.layers = []  # per layer: (updated k cache, updated v cache)
        self.starts = None

    def visit_var_binding_(self, binding) -> None:
        matched = self.root.extract_matched_expr(binding.value, self.var2val)
        if matched is not None:
            self.set_var_remap(binding.var, self.rewrite_core(matched))
            return
        if binding.var.same_as(self.output) and isinstance(binding.value, relax.Tuple):
            self.set_var_remap(binding.var, self.rewrite_outputs(binding.value))
            return
        super().visit_var_binding_(binding)

    def layer_of(self, past_k, past_v) -> int:
        key, value = _PAST.fullmatch(past_k.name), _PAST.fullmatch(past_v.name)
        if (past_k not in self.caches or past_v not in self.caches or key is None
                or value is None or (key[1], value[1]) != ("key", "value")
                or key[2] != value[2]):
            raise EdgertError(f"an attention core reads {past_k.name} and {past_v.name}; "
                              "expected past_key_i and past_value_i of one layer")
        layer = int(key[2])
        if layer != len(self.layers):
            raise EdgertError(f"the attention core of layer {layer} comes after "
                              f"{len(self.layers)} other cores; FuseDHSAPrefill needs the "
                              "layers in order (the boundary layer's chunk starts feed the "
                              "later ones)")
        return layer

    def new(self, expr):
        """The rewritten function's variable for an expression of main."""
        if not isinstance(expr, relax.Var):
            expr = self.var_of.get(expr, expr)
        return self.visit_expr(expr)

    def rewrite_core(self, matched):
        fuse, kernels, emit = self.fuse, self.kernels, self.builder_.emit
        past_k, new_k = self.bindings.past_and_new(matched[self.keys])
        past_v, new_v = self.bindings.past_and_new(matched[self.values])
        layer = self.layer_of(past_k, past_v)
        t = self.seq_len
        zero = relax.prim_value(tirx.IntImm("int64", 0))
        q = emit(relax.op.reshape(self.new(matched[self.query]), [t, fuse.h, fuse.d]))
        k = emit(fuse.kv_rows(self.new(new_k), t))
        v = emit(fuse.kv_rows(self.new(new_v), t))
        caches = []
        for cache, rows in ((self.caches[past_k], k), (self.caches[past_v], v)):
            caches.append(emit(relax.call_tir_inplace(kernels["append"], [cache, rows, zero],
                                                      inplace_indices=[0], out_ty=cache.ty)))
        self.layers.append(tuple(caches))
        out_ty = relax.TensorType([t, fuse.h, fuse.d], "float32")
        boundary = fuse.params.boundary_layer
        if layer < boundary:  # dense, causal over the cache
            out = emit(relax.call_tir(kernels["attention"],
                                      [q, caches[0], caches[1], self.tree_order, zero], out_ty))
        else:
            if layer == boundary:
                self.starts = emit(relax.call_tir(kernels["boundaries"],
                                                  [q, k, self.fixed_chunk],
                                                  relax.TensorType([t], "int32")))
            kernel = kernels["sparse_early" if fuse.params.is_early(layer) else "sparse"]
            out = emit(relax.call_tir(kernel, [q, k, v, self.starts], out_ty))
        return emit(relax.op.reshape(out, [1, t, fuse.h * fuse.d]))

    def rewrite_outputs(self, outputs: relax.Tuple):
        """(logits, hidden, present_*[, features]) -> (logits, hidden, updated caches
        [, features]) (features: every row's hidden state, in artifacts with a draft layer)."""
        presents = 2 * len(self.layers)
        if len(outputs.fields) not in (2 + presents, 3 + presents):
            raise EdgertError(f"main returns {len(outputs.fields)} values; expected logits, "
                              f"hidden, {presents} present K/V and perhaps features")
        fields = [self.new(f) for f in outputs.fields[:2]]
        fields += [cache for layer in self.layers for cache in layer]
        fields += [self.new(f) for f in outputs.fields[2 + presents:]]
        self.outputs_rewritten = True
        return self.builder_.emit_output(relax.Tuple(fields))
