"""FuseTreeAttention: the portable attention subgraph -> edgert kernels over an in-place cache.

Matches, in every layer of the imported ``model.onnx`` (``/layers.i/self_attn/core``)::

    Q [1,q,Hq*D] -> reshape [1,q,Hq,D] -> permute ------------------------------.
    Concat(past_key_i, K_new) -> expand_dims -> tile -> reshape -> permute -> matmul(q, k^T)
      -> multiply(scale) -> add(bias) -> softmax -> matmul(., V_rep) -> permute -> reshape
    Concat(past_value_i, V_new) -> expand_dims -> tile -> reshape -----------'

and replaces it with::

    k_cache_i = call_tir_inplace(edgert_kv_append, [k_cache_i, K_new as [q,Hkv,D], past])
    v_cache_i = call_tir_inplace(edgert_kv_append, [v_cache_i, V_new as [q,Hkv,D], past])
    out       = call_tir(edgert_tree_attention, [Q as [q,Hq,D], k_cache_i, v_cache_i,
                                                 tree_order, past]) -> reshape [1,q,Hq*D]

The function's signature changes accordingly: ``past_key_i``/``past_value_i`` [1,Hkv,past,D]
become the runtime's cache buffers ``k_cache_i``/``v_cache_i`` [Hkv,C,D] (written in place:
only the q new entries move), ``tree_mask`` [1,1,q,q] becomes ``tree_order`` [q,2] int32 (DFS
intervals, see ``kernels.tree_attention``), and a shape argument ``past`` carries the prefix
length. No whole-cache copy remains: no Concat of the past, no tile of the cache.

``mask="visibility"`` (the draft layer's graph, ``draft.portable.onnx``): ``tree_mask``
becomes ``visibility`` [q, w] float32 instead, the graph's additive mask without its two
leading axes, read by ``edgert_masked_attention`` over the last w keys (w = q: among the new
rows; w > q: the step's earlier draft rows too, a dynamic draft tree's ancestry).
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from edgert.errors import EdgertError
from edgert.passes.tir.tree_attention import (
    DEFAULT_KNOBS,
    MASKS,
    TreeAttentionKnobs,
    kv_append_tir,
    tree_attention_tir,
)

# the cache inputs: past_key_i/past_value_i (model.onnx), draft_past_key/value (the draft's)
CACHE_INPUT = re.compile(r"(draft_)?past_(key|value)(_\d+)?")


def core_pattern(softcap: bool = False):
    """softmax attention over repeated K/V, from the query reshape to the output reshape;
    ``softcap``: the scaled scores pass through c*tanh(./c) before the bias."""
    query = wildcard()
    keys = wildcard()
    values = wildcard()
    q = is_op("relax.permute_dims")(is_op("relax.reshape")(query, wildcard()))
    scores = is_op("relax.matmul")(q, is_op("relax.permute_dims")(keys))
    scaled = is_op("relax.multiply")(scores, wildcard())
    if softcap:
        tanh = is_op("relax.tanh")(is_op("relax.divide")(scaled, wildcard()))
        scaled = is_op("relax.multiply")(tanh, wildcard())
    probs = is_op("relax.nn.softmax")(is_op("relax.add")(scaled, wildcard()))
    out = is_op("relax.matmul")(probs, values)
    root = is_op("relax.reshape")(is_op("relax.permute_dims")(out), wildcard())
    return root, query, keys, values


class _Bindings:
    """Follow dataflow variables back to the expression bound to them."""

    def __init__(self, func: relax.Function) -> None:
        self.values = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                self.values[binding.var] = binding.value

    def value(self, expr):
        while isinstance(expr, relax.Var) and expr in self.values:
            expr = self.values[expr]
        return expr

    def past_and_new(self, repeated) -> tuple[relax.Var, relax.Expr]:
        """reshape(tile(expand_dims(concat((past, new))))) -> (past param, new [1,Hkv,q,D])."""
        expr = self.value(repeated)
        for _ in range(4):  # reshape / tile call_tir / expand_dims, in any order
            if isinstance(expr, relax.Call) and _op_name(expr) == "relax.concat":
                parts = self.value(expr.args[0])
                past, new = parts.fields
                return past, new
            if not isinstance(expr, relax.Call):
                break
            nxt = expr.args[1].fields[0] if _op_name(expr) == "relax.call_tir" else expr.args[0]
            expr = self.value(nxt)
        raise EdgertError("the attention's keys/values do not come from Concat(past, new); "
                          "was model.onnx exported by this edgert?")


def _op_name(call: relax.Call) -> str:
    return call.op.name if isinstance(call.op, tvm.ir.Op) else ""


@tvm.transform.module_pass(opt_level=0, name="FuseTreeAttention")
class FuseTreeAttention:
    """Rewrite every portable attention core of ``main`` into edgert's in-place kernels.

    Parameters
    ----------
    num_heads, num_kv_heads, head_dim : the model's attention shape.
    gpu : emit the GPU loop mapping of the kernels (thread blocks) instead of the CPU one.
    knobs : the tree-attention kernel's schedule (the tuning database's best, or untuned).
    softcap : the model's attention soft-capping (0: none), matched and applied in-kernel.
    mask : "tree" (``tree_order`` intervals) or "visibility" (a dense [q, w] row per token).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 gpu: bool = False, knobs: TreeAttentionKnobs = DEFAULT_KNOBS,
                 softcap: float = 0.0, mask: str = "tree") -> None:
        if mask not in MASKS:
            raise EdgertError(f"FuseTreeAttention's mask must be one of {MASKS}, got {mask!r}")
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.gpu = gpu
        self.knobs = knobs
        self.softcap = softcap
        self.mask = mask

    def _mask_param(self, q_len) -> relax.Var:
        """What replaces ``tree_mask``: the tree's intervals or the visibility rows."""
        if self.mask == "tree":
            return relax.Var("tree_order", relax.TensorType([q_len, 2], "int32"))
        width = tirx.Var("width", "int64")
        return relax.Var("visibility", relax.TensorType([q_len, width], "float32"))

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        bb = relax.BlockBuilder(mod)
        kernel = tree_attention_tir(self.h, self.hkv, self.d, self.gpu, self.knobs,
                                    self.softcap, self.mask)
        attn = bb.add_func(kernel, kernel.attrs["global_symbol"])
        append = bb.add_func(kv_append_tir(self.hkv, self.d, self.gpu), "edgert_kv_append")
        mod = bb.get()
        func = mod["main"]
        params = {p.name: p for p in func.params}
        q_len = params["input_ids"].ty.shape[1]
        cap = tirx.Var("capacity", "int64")
        past = tirx.Var("past", "int64")
        cache_ty = relax.TensorType([self.hkv, cap, self.d], "float32")
        caches = {}  # past_key_i param -> k_cache_i var
        for name, param in params.items():
            if CACHE_INPUT.fullmatch(name):
                caches[param] = relax.Var(name.replace("past_", "cache_", 1), cache_ty)
        mask_param = self._mask_param(q_len)
        past_shape = relax.Var("past", relax.ShapeType([past]))
        bindings = _Bindings(func)
        root, query, keys, values = core_pattern(bool(self.softcap))
        rewritten = []

        def rewrite(expr, matched):
            past_k, new_k = bindings.past_and_new(matched[keys])
            past_v, new_v = bindings.past_and_new(matched[values])
            if past_k not in caches or past_v not in caches:
                return expr
            k_cache = self._append(append, caches[past_k], new_k, past, q_len)
            v_cache = self._append(append, caches[past_v], new_v, past, q_len)
            q = relax.op.reshape(matched[query], [q_len, self.h, self.d])
            out = relax.call_tir(attn, [q, k_cache, v_cache, mask_param, relax.prim_value(past)],
                                 relax.TensorType([q_len, self.h, self.d], "float32"))
            rewritten.append(past_k)
            return relax.op.reshape(out, [1, q_len, self.h * self.d])

        body = rewrite_call(root, rewrite, func).body
        if len(rewritten) != len(caches) // 2:
            raise EdgertError(f"FuseTreeAttention rewrote {len(rewritten)} attention cores but "
                              f"the model has {len(caches) // 2} layers")
        new_params = [mask_param if p.name == "tree_mask" else caches.get(p, p)
                      for p in func.params] + [past_shape]
        new_func = relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs)
        new_func = new_func.with_attr("num_input", len(new_params))
        mod["main"] = new_func
        mod = relax.transform.DeadCodeElimination()(mod)
        return mod

    def _append(self, append, cache, new_bnsh, past, q_len):
        new = relax.op.reshape(relax.op.permute_dims(new_bnsh, [0, 2, 1, 3]),
                               [q_len, self.hkv, self.d])
        return relax.call_tir_inplace(append, [cache, new, relax.prim_value(past)],
                                      inplace_indices=[0], out_ty=cache.ty)
