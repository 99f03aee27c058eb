"""FuseTreeAttention: Before/Expected IR, and numerics of the rewritten model against ORT."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from edgert.medusa.tree_order import tree_order_from_parents  # noqa: E402
from edgert.passes.fuse_tree_attention import FuseTreeAttention  # noqa: E402
from edgert.passes.tir.tree_attention import kv_append_tir, tree_attention_tir  # noqa: E402

H, HKV, D = 4, 2, 16
GROUP = H // HKV


def _tensor(shape, dtype="float32"):
    return relax.TensorType(shape, dtype)


def before_module():
    """One portable attention core, as edgert's model.onnx imports (tile as an op here)."""
    q, past = tirx.Var("q", "int64"), tirx.Var("past", "int64")
    input_ids = relax.Var("input_ids", _tensor([1, q], "int64"))
    tree_mask = relax.Var("tree_mask", _tensor([1, 1, q, q]))
    query = relax.Var("query", _tensor([1, q, H * D]))
    k_new = relax.Var("k_new", _tensor([1, HKV, q, D]))
    v_new = relax.Var("v_new", _tensor([1, HKV, q, D]))
    past_k = relax.Var("past_key_0", _tensor([1, HKV, past, D]))
    past_v = relax.Var("past_value_0", _tensor([1, HKV, past, D]))
    op = relax.op
    bb = relax.BlockBuilder()
    with bb.function("main", [input_ids, tree_mask, query, k_new, v_new, past_k, past_v]):
        with bb.dataflow():
            def repeated(past_x, new_x):
                cat = bb.emit(op.concat([past_x, new_x], axis=2))
                rep = bb.emit(op.tile(bb.emit(op.expand_dims(cat, 2)), [1, 1, GROUP, 1, 1]))
                return bb.emit(op.reshape(rep, [1, H, past + q, D]))

            qh = bb.emit(op.permute_dims(bb.emit(op.reshape(query, [1, q, H, D])), [0, 2, 1, 3]))
            keys = repeated(past_k, k_new)
            values = repeated(past_v, v_new)
            scores = bb.emit(op.matmul(qh, bb.emit(op.permute_dims(keys, [0, 1, 3, 2]))))
            scaled = bb.emit(op.multiply(scores, relax.const(0.25, "float32")))
            zeros = bb.emit(op.zeros([1, 1, q, past], "float32"))
            bias = bb.emit(op.concat([zeros, tree_mask], axis=3))
            probs = bb.emit(op.nn.softmax(bb.emit(op.add(scaled, bias)), axis=-1))
            out = bb.emit(op.matmul(probs, values))
            res = bb.emit(op.reshape(bb.emit(op.permute_dims(out, [0, 2, 1, 3])), [1, q, H * D]))
            gv = bb.emit_output(res)
        bb.emit_func_output(gv)
    return bb.finalize()


def expected_module():
    q, past, cap = (tirx.Var(n, "int64") for n in ("q", "past", "capacity"))
    input_ids = relax.Var("input_ids", _tensor([1, q], "int64"))
    tree_order = relax.Var("tree_order", _tensor([q, 2], "int32"))
    query = relax.Var("query", _tensor([1, q, H * D]))
    k_new = relax.Var("k_new", _tensor([1, HKV, q, D]))
    v_new = relax.Var("v_new", _tensor([1, HKV, q, D]))
    k_cache = relax.Var("cache_key_0", _tensor([HKV, cap, D]))
    v_cache = relax.Var("cache_value_0", _tensor([HKV, cap, D]))
    past_shape = relax.Var("past", relax.ShapeType([past]))
    op = relax.op
    bb = relax.BlockBuilder()
    attn = bb.add_func(tree_attention_tir(H, HKV, D), "edgert_tree_attention")
    append = bb.add_func(kv_append_tir(HKV, D), "edgert_kv_append")
    params = [input_ids, tree_order, query, k_new, v_new, k_cache, v_cache, past_shape]
    with bb.function("main", params, attrs={"num_input": len(params)}):
        with bb.dataflow():
            def appended(cache, new):
                rows = bb.emit(op.reshape(bb.emit(op.permute_dims(new, [0, 2, 1, 3])),
                                          [q, HKV, D]))
                return bb.emit(relax.call_tir_inplace(
                    append, [cache, rows, relax.prim_value(past)], inplace_indices=[0],
                    out_ty=cache.ty))

            qr = bb.emit(op.reshape(query, [q, H, D]))
            kc = appended(k_cache, k_new)
            vc = appended(v_cache, v_new)
            out = bb.emit(relax.call_tir(attn, [qr, kc, vc, tree_order, relax.prim_value(past)],
                                         _tensor([q, H, D])))
            gv = bb.emit_output(op.reshape(out, [1, q, H * D]))
        bb.emit_func_output(gv)
    return bb.finalize()


def test_before_expected():
    after = FuseTreeAttention(H, HKV, D)(before_module())
    after = relax.transform.Normalize()(after)
    expected = relax.transform.Normalize()(expected_module())
    tvm.ir.assert_structural_equal(after["main"], expected["main"], map_free_vars=True)


def test_rewritten_model_matches_ort_on_a_tree_step(tiny_artifact):
    """The whole tiny model: imported, rewritten, built for llvm vs ORT's portable graph."""
    import onnx
    import onnxruntime as ort
    from tvm.relax.frontend.onnx import from_onnx

    path = tiny_artifact / "model.onnx"
    mod = FuseTreeAttention(4, 2, 16)(from_onnx(onnx.load(str(path)),
                                                 keep_params_in_input=False))
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    rng = np.random.default_rng(0)
    past, cap = 5, 32
    parents = [-1, 0, 0, 1, 2, 3]
    n = len(parents)
    mask = np.full((n, n), -1e9, np.float32)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = 0
            j = parents[j]
    pasts = {f"past_{k}_{i}": rng.standard_normal((1, HKV, past, D)).astype(np.float32)
             for i in range(2) for k in ("key", "value")}
    feeds = {"input_ids": rng.integers(0, 300, (1, n)),
             "position_ids": (past + np.array([0, 1, 1, 2, 2, 3]))[None],
             "tree_mask": mask[None, None], "logits_index": np.arange(n), **pasts}
    expected = ort.InferenceSession(str(path)).run(None, feeds)
    caches = []
    for i in range(2):
        for k in ("key", "value"):
            c = np.zeros((HKV, cap, D), np.float32)
            c[:, :past] = pasts[f"past_{k}_{i}"][0]
            caches.append(tvm.runtime.tensor(c))
    t = tvm.runtime.tensor
    out = vm["main"](t(feeds["input_ids"]), t(feeds["position_ids"]),
                     t(tree_order_from_parents(np.array(parents))), t(feeds["logits_index"]),
                     *caches, tvm.runtime.ShapeTuple([past]))
    np.testing.assert_allclose(out[0].numpy(), expected[0], atol=1e-4)
    # layer 1's new keys were written in place at [past, past + n)
    np.testing.assert_allclose(caches[2].numpy()[:, past:past + n], expected[4][0], atol=1e-5)
    assert not caches[2].numpy()[:, past + n:].any()
