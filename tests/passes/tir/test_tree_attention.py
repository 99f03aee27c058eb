"""edgert's TVM kernels against NumPy: tree-verification attention and in-place KV append."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.medusa.tree_order import causal_order, tree_order_from_parents
from edgert.passes.tir.tree_attention import TreeAttentionKnobs, tree_attention_reference

tvm = pytest.importorskip("tvm")
HQ, HKV, D = 4, 2, 8
LLVM = {"kind": "llvm", "num-cores": 2}


def test_tree_order_intervals_by_hand():
    # 0 -> {1, 2}, 1 -> 3, 2 -> 4: pre-order 0, 1, 3, 2, 4
    order = tree_order_from_parents(np.array([-1, 0, 0, 1, 2]))
    assert order.tolist() == [[0, 5], [1, 3], [3, 5], [2, 3], [4, 5]]
    np.testing.assert_array_equal(tree_order_from_parents(np.array([-1, 0, 1, 2])),
                                  causal_order(4))


def test_reference_with_causal_order_is_causal_attention():
    rng = np.random.default_rng(0)
    n, past, cap = 5, 3, 12
    q = rng.standard_normal((n, HQ, D)).astype(np.float32)
    kc = rng.standard_normal((HKV, cap, D)).astype(np.float32)
    vc = rng.standard_normal((HKV, cap, D)).astype(np.float32)
    out = tree_attention_reference(q, kc, vc, causal_order(n), past)
    keys = np.repeat(kc[:, :past + n], 2, axis=0)
    vals = np.repeat(vc[:, :past + n], 2, axis=0)
    for i in range(n):
        s = np.einsum("hd,htd->ht", q[i], keys[:, :past + i + 1]) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[i], np.einsum("ht,htd->hd", p, vals[:, :past + i + 1]),
                                   atol=1e-6)


KNOBS = [TreeAttentionKnobs(), TreeAttentionKnobs(2, 8, 8), TreeAttentionKnobs(1, 3, 4)]


@pytest.fixture(scope="module", params=KNOBS, ids=str)
def tree_kernel(request):
    """The untuned kernel and two tuned schedules (shared K/V loads, key tiles that do not
    divide the key count, vector lanes): all must compute the same attention."""
    from edgert.passes.tir.tree_attention import tree_attention_tir

    mod = tvm.IRModule({"edgert_tree_attention": tree_attention_tir(HQ, HKV, D,
                                                                    knobs=request.param)})
    return tvm.tirx.build(mod, tvm.target.Target(LLVM))["edgert_tree_attention"]


def run_against_reference(kernel, parents, past: int, cap: int, seed: int,
                          q_scale: float = 1.0, softcap: float = 0.0) -> tuple:
    """Random q and caches through ``kernel``, compared with the NumPy reference (atol
    1e-5); returns the reference's output and the inputs."""
    rng = np.random.default_rng(seed)
    n = len(parents)
    q = (q_scale * rng.standard_normal((n, HQ, D))).astype(np.float32)
    kc = rng.standard_normal((HKV, cap, D)).astype(np.float32)
    vc = rng.standard_normal((HKV, cap, D)).astype(np.float32)
    order = tree_order_from_parents(np.array(parents))
    out = tvm.runtime.tensor(np.zeros((n, HQ, D), np.float32))
    kernel(tvm.runtime.tensor(q), tvm.runtime.tensor(kc), tvm.runtime.tensor(vc),
           tvm.runtime.tensor(order), past, out)
    expected = tree_attention_reference(q, kc, vc, order, past, softcap=softcap)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    return expected, (q, kc, vc, order)


@pytest.mark.parametrize("past", [0, 1, 9])
@pytest.mark.parametrize("parents", [
    [-1],                      # one decode token
    [-1, 0, 1, 2],             # causal chunk
    [-1, 0, 0, 1, 2, 3],       # a Medusa-style tree
    [-1, 0, 0, 0, 1, 1, 2, 4],  # wider
])
def test_tree_attention_kernel_matches_numpy(tree_kernel, past, parents):
    run_against_reference(tree_kernel, parents, past, 24, past * 10 + len(parents))


@pytest.mark.parametrize("knobs", [TreeAttentionKnobs(), TreeAttentionKnobs(2, 3, 4)], ids=str)
def test_soft_capped_tree_attention_matches_numpy(knobs):
    """Gemma 2's c*tanh(score/c), with c small enough that it changes every weight."""
    from edgert.passes.tir.tree_attention import tree_attention_tir

    mod = tvm.IRModule({"edgert_tree_attention": tree_attention_tir(HQ, HKV, D, knobs=knobs,
                                                                    softcap=1.5)})
    kernel = tvm.tirx.build(mod, tvm.target.Target(LLVM))["edgert_tree_attention"]
    expected, (q, kc, vc, order) = run_against_reference(
        kernel, [-1, 0, 0, 1, 2, 3], past=5, cap=16, seed=7, q_scale=3.0, softcap=1.5)
    uncapped = tree_attention_reference(q, kc, vc, order, 5)
    assert np.abs(expected - uncapped).max() > 1e-2  # the cap is not a no-op here


def additive_attention(q, kc, vc, bias, past):
    """softmax(q K^T / sqrt(D) + bias) V over keys [0, past + n), ``bias`` [n, w] over the
    last w of them (0 before): the ONNX graphs' own semantics, independent of the kernel's
    visibility threshold."""
    n, w = bias.shape
    total = past + n
    full = np.concatenate([np.zeros((n, total - w), np.float32), bias], axis=1)
    keys = np.repeat(kc[:, :total], HQ // HKV, axis=0)
    values = np.repeat(vc[:, :total], HQ // HKV, axis=0)
    scores = np.einsum("ihd,htd->hit", q, keys) / np.sqrt(D) + full[None]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("hit,htd->ihd", probs / probs.sum(-1, keepdims=True), values)


@pytest.mark.parametrize("knobs", KNOBS, ids=str)
def test_masked_attention_kernel_matches_the_additive_mask(knobs):
    """The draft layer's kernel: a [n, w] mask of 0 / -1e9 (the runtime's MASK_VALUE) over
    the new rows (w = n) or the whole cache (w = past + n: a row hides some cached entries,
    as a dynamic draft tree's rows hide their cousins drafted earlier)."""
    from edgert.passes.tir.tree_attention import masked_attention_reference, tree_attention_tir
    from edgert.runtime.steps import MASK_VALUE

    mod = tvm.IRModule({"m": tree_attention_tir(HQ, HKV, D, knobs=knobs, mask="visibility")})
    kernel = tvm.tirx.build(mod, tvm.target.Target(LLVM))["edgert_masked_attention"]
    rng = np.random.default_rng(5)
    cap = 24
    for n, past, whole in [(1, 0, False), (4, 6, False), (1, 9, True), (5, 7, True)]:
        q = rng.standard_normal((n, HQ, D)).astype(np.float32)
        kc = rng.standard_normal((HKV, cap, D)).astype(np.float32)
        vc = rng.standard_normal((HKV, cap, D)).astype(np.float32)
        w = past + n if whole else n
        bias = np.where(rng.random((n, w)) < 0.5, MASK_VALUE, 0).astype(np.float32)
        bias[np.arange(n), w - n + np.arange(n)] = 0  # every row sees itself
        out = tvm.runtime.tensor(np.zeros((n, HQ, D), np.float32))
        kernel(tvm.runtime.tensor(q), tvm.runtime.tensor(kc), tvm.runtime.tensor(vc),
               tvm.runtime.tensor(bias), past, out)
        expected = additive_attention(q, kc, vc, bias, past)
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(masked_attention_reference(q, kc, vc, bias, past), expected,
                                   atol=1e-5)


def test_knobs_that_do_not_fit_are_refused():
    from edgert.passes.tir.tree_attention import tree_attention_tir

    with pytest.raises(ValueError, match="do not fit"):
        tree_attention_tir(HQ, HKV, D, knobs=TreeAttentionKnobs(lanes=3))


def test_kv_append_writes_only_the_new_entries_in_place():
    from tvm import relax, tirx

    from edgert.passes.tir.tree_attention import kv_append_tir

    bb = relax.BlockBuilder()
    gv = bb.add_func(kv_append_tir(HKV, D), "edgert_kv_append")
    cap, n, past = (tirx.Var(name, "int64") for name in ("cap", "n", "past"))
    cache = relax.Var("cache", relax.TensorType([HKV, cap, D], "float32"))
    new = relax.Var("new", relax.TensorType([n, HKV, D], "float32"))
    past_shape = relax.Var("past", relax.ShapeType([past]))
    with bb.function("main", [cache, new, past_shape]):
        out = bb.emit(relax.call_tir_inplace(gv, [cache, new, relax.prim_value(past)],
                                             inplace_indices=[0], out_ty=cache.ty))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.finalize(), tvm.target.Target(LLVM)), tvm.cpu())
    before = np.arange(HKV * 10 * D, dtype=np.float32).reshape(HKV, 10, D)
    buffer = tvm.runtime.tensor(before)
    vm["main"](buffer, tvm.runtime.tensor(np.full((3, HKV, D), -1, np.float32)),
               tvm.runtime.ShapeTuple([4]))
    after = buffer.numpy()
    np.testing.assert_array_equal(after[:, 4:7], -1)
    np.testing.assert_array_equal(after[:, :4], before[:, :4])
    np.testing.assert_array_equal(after[:, 7:], before[:, 7:])
