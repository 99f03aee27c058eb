"""The draft layer on the TVM backend: ``draft.portable.onnx`` compiled to ``draft.so``, its
calls equal to ONNX Runtime's draft graph, and speculative decoding with it lossless."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import edgert  # noqa: E402
from edgert.passes.build import compile_artifact  # noqa: E402
from edgert.runtime.steps import MASK_VALUE, causal_mask  # noqa: E402
from tests.runtime.drafts import PROMPTS, TRAIN_PROMPTS, export  # noqa: E402


def compiled_export(tiny_dir, draft_dir, root, **options):
    art = export(tiny_dir, root / "art", draft_dir, **options)
    compile_artifact(art, "llvm", dump_ir=root / "ir", log=lambda m: None)
    return art


@pytest.fixture(scope="module")
def fp32_draft(tiny_dir, trained_draft_dir, tmp_path_factory):
    """The trained draft kept fp32: TVM's numerics equal ONNX Runtime's."""
    return compiled_export(tiny_dir, trained_draft_dir, tmp_path_factory.mktemp("f"),
                           draft_weights="fp32")


@pytest.fixture(scope="module")
def q8_draft(tiny_dir, trained_draft_dir, tmp_path_factory):
    """The default: the draft's own matrices 8-bit (MatMulNBits, dequantized in TVM)."""
    return compiled_export(tiny_dir, trained_draft_dir, tmp_path_factory.mktemp("q"))


@pytest.fixture(scope="module")
def backends(fp32_draft):
    return edgert.load(fp32_draft).backend, edgert.load(fp32_draft, backend="tvm").backend


def test_the_build_has_the_draft_and_shares_its_weights(fp32_draft):
    import onnx
    from onnx.external_data_helper import uses_external_data

    manifest = json.loads((fp32_draft / "edgert.json").read_text())
    assert "draft.so" in manifest["compiled"]["llvm"]["files"]
    assert manifest["graphs"]["draft_portable"]["file"] == "draft.portable.onnx"
    assert [t["name"] for t in manifest["graphs"]["portable"]["outputs"]][-1] == "features"
    ir = (fp32_draft.parent / "ir" / "draft-1-edgert.py").read_text()
    assert "edgert_masked_attention" in ir and "R.concat((draft_past_key" not in ir

    def external(file):
        graph = onnx.load(str(fp32_draft / file), load_external_data=False).graph
        return {init.name: list(init.external_data) for init in graph.initializer
                if uses_external_data(init)}

    portable, ort_draft = external("draft.portable.onnx"), external("draft.onnx")
    assert portable and portable.items() <= {**ort_draft, **external("model.ort.onnx")}.items()


def test_draft_calls_match_onnx_runtime(backends, loaded):
    """A causal call of 7 rows, then a dynamic-tree call of 3 rows over the whole cache (each
    row hides some drafted entries): top-k ids equal, log-probabilities and features within
    1e-4, and the draft caches equal; the tree call's mask narrowed to the step's rows gives
    the same call."""
    rng = np.random.default_rng(0)
    h, vocab = loaded.config.hidden_size, loaded.config.vocab_size
    p, q = 7, 3
    tree = np.full((1, 1, q, p + q), MASK_VALUE, np.float32)
    tree[..., :5] = 0
    tree[0, 0, 0, 5] = tree[0, 0, 1, 6] = 0
    tree[0, 0, 2, [5, 6]] = 0
    tree[0, 0, np.arange(q), p + np.arange(q)] = 0
    calls = [(rng.integers(0, vocab, (1, p)), rng.standard_normal((1, p, h)),
              np.arange(1, p + 1)[None], causal_mask(p), np.arange(p), 0),
             (rng.integers(0, vocab, (1, q)), rng.standard_normal((1, q, h)),
              np.array([[6, 7, 7]]), tree, np.arange(q), p)]
    for ids, features, positions, mask, index, past in calls:
        want, got = (b.draft_forward(ids, features.astype(np.float32), positions, mask, index,
                                     past) for b in backends)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], atol=1e-4)
        np.testing.assert_allclose(got[2], want[2], atol=1e-4)
    # the runtime's dynamic trees pass the mask over this step's rows only (the first 5
    # entries committed, all visible): the same call as the whole-cache mask, on both backends
    ids, features, positions, mask, index, past = calls[1]
    for b in backends:
        whole = b.draft_forward(ids, features.astype(np.float32), positions, mask, index, past)
        narrow = b.draft_forward(ids, features.astype(np.float32), positions,
                                 np.ascontiguousarray(mask[..., 5:]), index, past)
        np.testing.assert_array_equal(narrow[0], whole[0])
        np.testing.assert_allclose(narrow[1], whole[1], atol=1e-6)
        np.testing.assert_allclose(narrow[2], whole[2], atol=1e-6)
    ort_cache, tvm_cache = (b.draft_cache.storage[..., :p + q, :] for b in backends)
    np.testing.assert_allclose(tvm_cache, ort_cache, atol=1e-5)


def test_features_match_onnx_runtime(fp32_draft):
    ort_engine, tvm_engine = edgert.load(fp32_draft), edgert.load(fp32_draft, backend="tvm")
    ids = ort_engine.encode(PROMPTS[1])
    want, got = ort_engine.prefill_ids(ids), tvm_engine.prefill_ids(ids)
    assert got.features.shape == want.features.shape == (len(ids), want.hidden.shape[-1])
    np.testing.assert_allclose(got.features, want.features, atol=1e-4)


@pytest.mark.parametrize("mode", ["draft", "draft+lookup"])
def test_tvm_drafting_is_lossless_and_steps_as_onnx_runtime(fp32_draft, mode):
    """Output equals plain greedy; the same steps and accepted tokens as ONNX Runtime's
    drafting (the same dynamic trees), most of them the draft's."""
    ort_engine, tvm_engine = edgert.load(fp32_draft), edgert.load(fp32_draft, backend="tvm")
    assert tvm_engine.has_draft and tvm_engine.default_speculative == "draft+lookup"
    steps = accepted = 0
    for prompt in TRAIN_PROMPTS[:4]:
        plain = ort_engine.generate(prompt, max_new_tokens=32, speculative="off")
        want = ort_engine.generate(prompt, max_new_tokens=32, speculative=mode)
        got = tvm_engine.generate(prompt, max_new_tokens=32, speculative=mode)
        assert got.output_ids == plain.output_ids, prompt
        assert (got.stats["steps"], got.stats["accepted_by"]) == (
            want.stats["steps"], want.stats["accepted_by"]), prompt
        steps += got.stats["steps"]
        accepted += got.stats["accepted_by"]["draft"]
    assert accepted / steps > 0.5, (accepted, steps)


def test_the_8_bit_draft_on_tvm(q8_draft):
    """The default draft (8-bit own matrices, TVM dequantizes them in its matmul kernels):
    lossless, its tokens accepted."""
    ort_engine, tvm_engine = edgert.load(q8_draft), edgert.load(q8_draft, backend="tvm")
    steps = accepted = 0
    for prompt in TRAIN_PROMPTS[:3]:
        plain = ort_engine.generate(prompt, max_new_tokens=32, speculative="off")
        got = tvm_engine.generate(prompt, max_new_tokens=32, speculative="draft")
        assert got.output_ids == plain.output_ids, prompt
        steps += got.stats["steps"]
        accepted += got.stats["accepted_by"]["draft"]
    assert accepted / steps > 0.5, (accepted, steps)


def test_draft_cache_on_the_device_path(fp32_draft):
    """kv_on_device (the GPU's cache code path, on the CPU): the draft's cache is a TVM
    buffer too, allocated once when drafting starts; same tokens."""
    from edgert.runtime.device_kv_cache import DeviceKVCache

    engine = edgert.load(fp32_draft, backend="tvm", kv_on_device=True)
    reference = edgert.load(fp32_draft)
    engine.generate(PROMPTS[0], max_new_tokens=8, speculative="off")
    assert engine.backend._draft_cache is None
    got = engine.generate(TRAIN_PROMPTS[0], max_new_tokens=32, speculative="draft")
    cache = engine.backend.draft_cache
    assert isinstance(cache, DeviceKVCache) and not cache.can_move_entries
    assert got.output_ids == reference.generate(TRAIN_PROMPTS[0], max_new_tokens=32,
                                                speculative="draft").output_ids
    engine.generate(TRAIN_PROMPTS[1], max_new_tokens=16, speculative="draft")
    assert engine.backend.draft_cache is cache


def test_a_build_without_the_draft_does_not_draft(fp32_draft, tmp_path):
    """A build from before the portable draft graph (no draft.so): the backend says it has
    no draft layer, and naming it is a clear error."""
    art = tmp_path / "art"
    shutil.copytree(fp32_draft, art)
    manifest = json.loads((art / "edgert.json").read_text())
    build = manifest["compiled"]["llvm"]
    build["files"].remove("draft.so")
    del build["hashes"]["draft.so"]
    (art / "edgert.json").write_text(json.dumps(manifest))
    engine = edgert.load(art, backend="tvm", verify=False)
    assert not engine.has_draft
    with pytest.raises(edgert.GenerationError, match="build has no draft layer.*re-run "
                                                     "`edgert compile`"):
        engine.generate(PROMPTS[0], max_new_tokens=4, speculative="draft")


@pytest.mark.parametrize("target, ext", [("opencl", "cl"), ("webgpu", "wgsl")])
def test_gpu_builds_have_the_draft_kernel(fp32_draft, target, ext):
    record = compile_artifact(fp32_draft, target, log=lambda m: None)
    assert f"draft.{ext}" in record["files"]
    source = (fp32_draft / "tvm" / target / f"draft.{ext}").read_text()
    assert "edgert_masked_attention" in source and "edgert_kv_append" in source


def test_dhsa_prefill_returns_the_features_too(tiny_dir, trained_draft_dir, tmp_path):
    """TVM's prefill_dhsa returns every row's features like main (FuseDHSAPrefill keeps the
    output): those of ONNX Runtime's DHSA graph run over the whole prompt in one call, as
    prefill_dhsa runs it; drafting after a sparse prefill is lossless."""
    from edgert.dhsa.params import DHSAParams

    params = DHSAParams(block_size=16, budget=64, local=16, sink=4, dense_tail=8,
                        probe_stride=8, min_context=128, prefill_chunk=64, early_layers=0)
    art = compiled_export(tiny_dir, trained_draft_dir, tmp_path, draft_weights="fp32",
                          dhsa=params)
    ort_engine, tvm_engine = edgert.load(art), edgert.load(art, backend="tvm")
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    ids = ort_engine.encode(text, chat=False)
    t = len(ids)
    assert t > params.min_context and tvm_engine.backend.has_dhsa
    session = ort_engine.backend.dhsa_session
    spec = ort_engine.manifest.kv_cache
    empty = np.zeros((1, spec.num_kv_heads, spec.capacity, spec.head_dim), np.float32)
    feed = {"input_ids": np.array([ids]), "position_ids": np.arange(t)[None],
            "logits_index": np.array([t - 1]), "dhsa_fixed_chunk": np.array(0),
            "prompt_length": np.array(t), "past_chunk_starts": np.zeros(0, bool),
            **{f"past_{kind}_{i}": empty.copy() for i in range(spec.num_layers)
               for kind in ("key", "value")}}
    names = [o.name for o in session.get_outputs()]
    want = session.run(["features"], {i.name: feed[i.name] for i in session.get_inputs()})[0]
    assert names[-1] == "features"
    got = tvm_engine.prefill_ids(ids, sparse=True)
    np.testing.assert_allclose(got.features, want[0], atol=1e-4)
    plain = ort_engine.generate(text, max_new_tokens=24, chat=False, dhsa=True,
                                speculative="off")
    drafted = tvm_engine.generate(text, max_new_tokens=24, chat=False, dhsa=True,
                                  speculative="draft")
    assert drafted.stats["prefill"] == "dhsa" and drafted.output_ids == plain.output_ids


def test_tune_covers_the_draft_matmuls(fp32_draft, q8_draft, loaded):
    """`edgert tune` measures the draft layer's matmuls too, at the format its graph stores
    them in (fp32, or its own 8-bit blocks), and compile applies what it finds to draft.so."""
    from edgert.artifact.io import load_manifest
    from edgert.passes.tuning.tunable import TuneScope, workloads_for

    h = loaded.config.hidden_size
    for art, fc in ((fp32_draft, f"matmul_{2 * h}_{h}"), (q8_draft, f"quant_matmul8_{2 * h}_{h}")):
        manifest = load_manifest(art)
        assert TuneScope.from_manifest(manifest).draft_shapes == frozenset()
        scope = TuneScope.from_manifest(manifest, art)
        names = {w.name for w in workloads_for(scope, ["matmul", "quant_matmul"])}
        assert fc in names, sorted(names)


def test_a_4_bit_artifact_drafts_on_tvm(tiny_dir, trained_draft_dir, tmp_path):
    """A 4-bit artifact: its draft's projection reads rows of lm_head's blocks (a Gather of
    the quantized tensor, folded at import). At --compute fp32 TVM's plain and drafted
    outputs equal ONNX Runtime's plain greedy ones."""
    from edgert.export.quantize import WeightOptions

    art = compiled_export(tiny_dir, trained_draft_dir, tmp_path,
                          weights=WeightOptions(weights="q4", compute="fp32"))
    ort_engine, tvm_engine = edgert.load(art), edgert.load(art, backend="tvm")
    assert tvm_engine.has_draft
    accepted = 0
    for prompt in TRAIN_PROMPTS[:2]:
        plain = ort_engine.generate(prompt, max_new_tokens=32, speculative="off").output_ids
        assert tvm_engine.generate(prompt, max_new_tokens=32, speculative="off").output_ids \
            == plain
        drafted = tvm_engine.generate(prompt, max_new_tokens=32, speculative="draft+lookup")
        assert drafted.output_ids == plain, prompt
        accepted += drafted.stats["accepted_by"]["draft"]
    assert accepted > 0
