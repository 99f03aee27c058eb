"""FuseDHSAPrefill: Before/Expected IR, and the compiled tiny model's ``prefill_dhsa`` (tvm
backend) against ONNX Runtime's ``model.dhsa.onnx``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

import edgert  # noqa: E402
from edgert.dhsa.params import DHSAParams  # noqa: E402
from edgert.errors import BackendError  # noqa: E402
from edgert.passes.fuse_dhsa_prefill import FuseDHSAPrefill  # noqa: E402
from edgert.passes.tir.dhsa_attention import dhsa_attention_tir  # noqa: E402
from edgert.passes.tir.dhsa_boundaries import dhsa_boundaries_tir  # noqa: E402
from edgert.passes.tir.tree_attention import kv_append_tir, tree_attention_tir  # noqa: E402

H, HKV, D = 4, 2, 16
GROUP = H // HKV
PARAMS = DHSAParams(block_size=16, budget=64, local=16, sink=4, dense_tail=8, probe_stride=8,
                    min_context=128, early_layers=0)


def _tensor(shape, dtype="float32"):
    return relax.TensorType(shape, dtype)


def before_module():
    """Two portable attention cores (layer 1's query reads layer 0's output), returning
    (logits, hidden, present K/V) as edgert's model.onnx does (tile as an op here)."""
    q, past = tirx.Var("q", "int64"), tirx.Var("past", "int64")
    input_ids = relax.Var("input_ids", _tensor([1, q], "int64"))
    tree_mask = relax.Var("tree_mask", _tensor([1, 1, q, q]))
    query = relax.Var("query", _tensor([1, q, H * D]))
    new = {(kind, i): relax.Var(f"{kind}_new_{i}", _tensor([1, HKV, q, D]))
           for i in range(2) for kind in ("k", "v")}
    pasts = {(kind, i): relax.Var(f"past_{name}_{i}", _tensor([1, HKV, past, D]))
             for i in range(2) for kind, name in (("k", "key"), ("v", "value"))}
    params = [input_ids, tree_mask, query]
    for i in range(2):
        params += [new["k", i], new["v", i], pasts["k", i], pasts["v", i]]
    op = relax.op
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            def repeated(past_x, new_x):
                cat = bb.emit(op.concat([past_x, new_x], axis=2))
                rep = bb.emit(op.tile(bb.emit(op.expand_dims(cat, 2)), [1, 1, GROUP, 1, 1]))
                return bb.emit(op.reshape(rep, [1, H, past + q, D]))

            zeros = bb.emit(op.zeros([1, 1, q, past], "float32"))
            bias = bb.emit(op.concat([zeros, tree_mask], axis=3))
            x = query
            for i in range(2):
                qh = bb.emit(op.permute_dims(bb.emit(op.reshape(x, [1, q, H, D])),
                                             [0, 2, 1, 3]))
                keys = repeated(pasts["k", i], new["k", i])
                values = repeated(pasts["v", i], new["v", i])
                scores = bb.emit(op.matmul(qh, bb.emit(op.permute_dims(keys, [0, 1, 3, 2]))))
                scaled = bb.emit(op.multiply(scores, relax.const(0.25, "float32")))
                probs = bb.emit(op.nn.softmax(bb.emit(op.add(scaled, bias)), axis=-1))
                out = bb.emit(op.matmul(probs, values))
                attn = bb.emit(op.reshape(bb.emit(op.permute_dims(out, [0, 2, 1, 3])),
                                          [1, q, H * D]))
                x = bb.emit(op.add(x, attn))
            gv = bb.emit_output(relax.Tuple([x, query, new["k", 0], new["v", 0],
                                             new["k", 1], new["v", 1]]))
        bb.emit_func_output(gv)
    return bb.finalize()


def expected_module(boundary_layer: int):
    params = DHSAParams(**{**PARAMS.to_dict(), "boundary_layer": boundary_layer})
    q, cap = tirx.Var("q", "int64"), tirx.Var("capacity", "int64")
    input_ids = relax.Var("input_ids", _tensor([1, q], "int64"))
    tree_order = relax.Var("tree_order", _tensor([q, 2], "int32"))
    query = relax.Var("query", _tensor([1, q, H * D]))
    new = {(kind, i): relax.Var(f"{kind}_new_{i}", _tensor([1, HKV, q, D]))
           for i in range(2) for kind in ("k", "v")}
    caches = {(kind, i): relax.Var(f"cache_{name}_{i}", _tensor([HKV, cap, D]))
              for i in range(2) for kind, name in (("k", "key"), ("v", "value"))}
    fixed_chunk = relax.Var("fixed_chunk", tvm.ir.PrimType("int32"))
    func_params = [input_ids, tree_order, query]
    for i in range(2):
        func_params += [new["k", i], new["v", i], caches["k", i], caches["v", i]]
    func_params.append(fixed_chunk)
    op = relax.op
    zero = relax.prim_value(tirx.IntImm("int64", 0))
    bb = relax.BlockBuilder()
    attention = bb.add_func(tree_attention_tir(H, HKV, D), "edgert_tree_attention")
    append = bb.add_func(kv_append_tir(HKV, D), "edgert_kv_append")
    boundaries = bb.add_func(dhsa_boundaries_tir(H, HKV, D, params), "edgert_dhsa_boundaries")
    sparse = bb.add_func(dhsa_attention_tir(H, HKV, D, params), "edgert_dhsa_attention")
    with bb.function("prefill_dhsa", func_params, attrs={"num_input": len(func_params)}):
        with bb.dataflow():
            def rows(new_x):
                return bb.emit(op.reshape(bb.emit(op.permute_dims(new_x, [0, 2, 1, 3])),
                                          [q, HKV, D]))

            x, starts, updated = query, None, []
            for i in range(2):
                qr = bb.emit(op.reshape(x, [q, H, D]))
                k, v = rows(new["k", i]), rows(new["v", i])
                kc, vc = (bb.emit(relax.call_tir_inplace(append, [cache, r, zero],
                                                         inplace_indices=[0], out_ty=cache.ty))
                          for cache, r in ((caches["k", i], k), (caches["v", i], v)))
                updated += [kc, vc]
                out_ty = _tensor([q, H, D])
                if i < boundary_layer:
                    out = bb.emit(relax.call_tir(attention, [qr, kc, vc, tree_order, zero],
                                                 out_ty))
                else:
                    if i == boundary_layer:
                        starts = bb.emit(relax.call_tir(boundaries, [qr, k, fixed_chunk],
                                                        _tensor([q], "int32")))
                    out = bb.emit(relax.call_tir(sparse, [qr, k, v, starts], out_ty))
                attn = bb.emit(op.reshape(out, [1, q, H * D]))
                x = bb.emit(op.add(x, attn))
            gv = bb.emit_output(relax.Tuple([x, query, *updated]))
        bb.emit_func_output(gv)
    return bb.finalize()


@pytest.mark.parametrize("boundary_layer", [0, 1])
def test_before_expected(boundary_layer):
    params = DHSAParams(**{**PARAMS.to_dict(), "boundary_layer": boundary_layer})
    before = before_module()
    after = relax.transform.Normalize()(FuseDHSAPrefill(H, HKV, D, params)(before))
    expected = relax.transform.Normalize()(expected_module(boundary_layer))
    tvm.ir.assert_structural_equal(after["prefill_dhsa"], expected["prefill_dhsa"],
                                   map_free_vars=True)
    tvm.ir.assert_structural_equal(after["main"], before["main"])  # main is left unchanged
    relax.analysis.well_formed(after)


def test_boundary_layer_past_the_last_layer_is_dense():
    """As in model.dhsa.onnx: no layer reaches the boundary layer, so all attend densely."""
    params = DHSAParams(**{**PARAMS.to_dict(), "boundary_layer": 2})
    after = relax.transform.DeadCodeElimination()(
        FuseDHSAPrefill(H, HKV, D, params)(before_module()))
    script = after["prefill_dhsa"].script()
    assert script.count("edgert_tree_attention,") == 2 and "edgert_dhsa" not in script


def test_per_kv_head_selection_is_refused_in_one_line():
    """The TVM kernel selects one key set for all heads: an artifact that selects per KV
    head is refused, naming the setting and the fix, before any rewrite."""
    params = DHSAParams(**{**PARAMS.to_dict(), "per_kv_head": 1})
    with pytest.raises(BackendError, match="per_kv_head=0"):
        FuseDHSAPrefill(H, HKV, D, params)


def test_compile_refuses_per_kv_head_before_importing(tiny_dhsa_artifact, tmp_path):
    """`edgert compile` checks the DHSA settings first: one line, nothing written."""
    from edgert.artifact.io import update_manifest
    from edgert.passes.build import compile_artifact

    art = tmp_path / "artifact"
    shutil.copytree(tiny_dhsa_artifact, art)
    dhsa = {**DHSAParams.from_dict(edgert.load(art).manifest.dhsa).to_dict(), "per_kv_head": 1}
    update_manifest(art, {"dhsa": dhsa})
    with pytest.raises(BackendError, match="per_kv_head=0"):
        compile_artifact(art, "llvm", log=lambda m: None)
    assert not (art / "tvm" / "llvm").exists()


# -- the tiny model, compiled --------------------------------------------------------------
@pytest.fixture(scope="module", params=[(0, 0), (1, 0), (0, 1)],
                ids=["boundary0", "boundary1", "early"])
def compiled(request, tiny_dir, tiny_dhsa_artifact, tmp_path_factory):
    """The tiny DHSA artifact compiled for llvm: boundaries at layer 0 (both layers sparse), or
    at layer 1 (layer 0 dense through edgert_tree_attention, layer 1 sparse), or at layer 0
    with layer 0 selecting twice the budget (edgert_dhsa_attention_early; 128 of the prompt's
    200 keys). One prefill call per prompt (``prefill_chunk = 0``): the form the TVM kernel
    computes."""
    from edgert.artifact.io import load_manifest
    from edgert.export.exporter import ExportOptions, export_model
    from edgert.passes.build import compile_artifact

    art = tmp_path_factory.mktemp("tvm_dhsa") / "artifact"
    boundary, early = request.param
    base = load_manifest(tiny_dhsa_artifact).dhsa
    params = {**base, "boundary_layer": boundary, "prefill_chunk": 0,
              "early_layers": early, "early_budget": 2 * base["budget"] if early else 0}
    export_model(str(tiny_dir), art, ExportOptions(max_context=512, dhsa=DHSAParams(**params)),
                 log=lambda m: None)
    compile_artifact(art, "llvm", log=lambda m: None)
    return art


@pytest.fixture(scope="module")
def engines(compiled):
    return edgert.load(compiled), edgert.load(compiled, backend="tvm")


PROMPT = np.random.default_rng(0).integers(3, 300, 200).tolist()


def _prefill(engine, ids, fixed_chunk):
    from edgert.runtime.steps import prefill_sparse

    engine.cache.reset()
    engine.cache.storage[...] = 0  # (in place: the backends hold views of it)
    out = prefill_sparse(engine.backend, engine.cache, ids, fixed_chunk)
    return out, engine.cache.storage[..., :len(ids), :].copy()


@pytest.mark.parametrize("fixed_chunk", [0, 16])
def test_prefill_sparse_matches_ort(engines, fixed_chunk):
    ort_engine, tvm_engine = engines
    assert tvm_engine.backend.has_dhsa and tvm_engine.dhsa == ort_engine.dhsa
    assert len(PROMPT) > tvm_engine.dhsa.min_context
    want, want_kv = _prefill(ort_engine, PROMPT, fixed_chunk)
    got, got_kv = _prefill(tvm_engine, PROMPT, fixed_chunk)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    np.testing.assert_allclose(got.hidden, want.hidden, atol=1e-4)
    np.testing.assert_allclose(got_kv, want_kv, atol=1e-4)  # written in place at [0, T)
    assert not tvm_engine.cache.storage[..., len(PROMPT):, :].any()


@pytest.mark.parametrize("fixed_chunk", [0, 16])
def test_every_token_matches_ort(engines, fixed_chunk):
    """Logits of all prompt tokens (the last one is in the dense tail, and with boundaries at
    the last layer its logits are dense ones): equal to ORT's, and not the dense ones."""
    from edgert.runtime.backends import StepInputs
    from edgert.runtime.steps import causal_mask

    ort_engine, tvm_engine = engines
    t = len(PROMPT)
    ids, positions = np.array([PROMPT]), np.arange(t)[None]
    everything = np.arange(t)
    empty_cache = np.zeros((1, HKV, 256, D), np.float32)
    want = ort_engine.backend.dhsa_session.run(None, {
        "input_ids": ids, "position_ids": positions, "logits_index": everything,
        "dhsa_fixed_chunk": np.array(fixed_chunk), "prompt_length": np.array(t),
        "past_chunk_starts": np.zeros(0, bool),
        **{f"past_{kind}_{i}": empty_cache for i in range(2) for kind in ("key", "value")}
    })[0][0]
    tensor = tvm.runtime.tensor
    caches = [tensor(np.zeros((HKV, 256, D), np.float32)) for _ in range(4)]
    got = tvm_engine.backend.vm["prefill_dhsa"](
        tensor(ids), tensor(positions), tensor(np.stack([everything, np.full(t, t)], 1)
                                               .astype(np.int32)),
        tensor(everything), *caches, fixed_chunk)[0].numpy()[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    tvm_engine.cache.reset()
    dense = tvm_engine.backend.forward(StepInputs(ids, positions, causal_mask(t), everything, 0,
                                                  np.arange(-1, t - 1))).logits
    assert np.abs(dense - got).max() > 1e-2  # sparse attention changed some tokens


def test_generate_with_dhsa_matches_ort(engines):
    ort_engine, tvm_engine = engines
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    want = ort_engine.generate(text, max_new_tokens=16, chat=False, dhsa=True)
    got = tvm_engine.generate(text, max_new_tokens=16, chat=False, dhsa=True)
    assert got.stats["prefill"] == "dhsa" and want.stats["prefill"] == "dhsa"
    assert got.output_ids == want.output_ids


def test_dhsa_prefill_into_the_device_cache_matches_ort(compiled, engines):
    """prefill_dhsa writing K/V in place into TVM-allocated cache buffers (the GPU's path)."""
    from edgert.runtime.steps import prefill_sparse

    ort_engine, _ = engines
    device = edgert.load(compiled, backend="tvm", kv_on_device=True)
    want, want_kv = _prefill(ort_engine, PROMPT, 0)
    got = prefill_sparse(device.backend, device.cache, PROMPT, 0)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    kv = device.cache.to_numpy()
    np.testing.assert_allclose(kv[..., :len(PROMPT), :], want_kv, atol=1e-4)
    assert not kv[..., len(PROMPT):, :].any()
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    want = ort_engine.generate(text, max_new_tokens=16, chat=False, dhsa=True)
    got = device.generate(text, max_new_tokens=16, chat=False, dhsa=True)
    assert got.stats["prefill"] == "dhsa" and got.output_ids == want.output_ids


@pytest.mark.parametrize("target, ext", [("cuda", "cu"), ("webgpu", "wgsl")])
def test_gpu_build_has_the_dhsa_kernels(tiny_dhsa_artifact, tmp_path, target, ext):
    from edgert.passes.build import compile_artifact

    art = tmp_path / "artifact"
    shutil.copytree(tiny_dhsa_artifact, art)
    compile_artifact(art, target, log=lambda m: None)
    source = (art / "tvm" / target / f"decoder.{ext}").read_text()
    for kernel in ("edgert_dhsa_attention", "edgert_dhsa_boundaries", "edgert_tree_attention",
                   "edgert_kv_append"):
        assert kernel in source
    if target == "webgpu":
        assert "i64" not in source  # WGSL has no 64-bit integers
