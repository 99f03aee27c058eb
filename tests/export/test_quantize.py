"""Quantized weights in the exported graphs (MatMulNBits, the quantized tied embedding).

Each quantized artifact is compared with an fp32 artifact of the *dequantized* weights: with
``--compute fp32`` the two must agree to float rounding (MatMulNBits dequantizes in the kernel;
the asymmetric correction and the embedding are exact), with ``--compute int8`` to the
activation quantization's error.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

import edgert
from edgert.errors import ConfigError
from edgert.export.exporter import ExportOptions, export_loaded
from edgert.export.quantize import WeightOptions, hf_weight_name, plan_quantization
from edgert.model.block_quant import from_gguf, quantize_rtn
from edgert.model.sources import load_model

IDS = [5, 17, 120, 7, 300, 42, 42, 9, 250, 3, 77, 1]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(str(tiny_dir))


def blocks_of(weight: np.ndarray, kind):
    """``kind``: 4 or 8 (round to nearest: integer zero point / symmetric), or a GGUF type
    name ("Q4_1": the minimum form, "Q4_0", "Q8_0") quantized by the gguf package."""
    if isinstance(kind, int):
        return quantize_rtn(weight, kind, source=f"Q{kind}_test")
    gguf = pytest.importorskip("gguf")
    raw = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[kind])
    return from_gguf(raw, kind, *weight.shape)


def with_blocks(loaded, kinds: dict):
    """The model with these weights replaced by their block form (as a quantized GGUF would
    carry them: exact blocks, and fp32 values equal to their dequantization)."""
    state = dict(loaded.state_dict)
    blocks = {}
    for name, kind in kinds.items():
        blocks[name] = blocks_of(state[name].numpy(), kind)
        state[name] = torch.from_numpy(blocks[name].dequantize())
    return dataclasses.replace(loaded, state_dict=state, quantized=blocks,
                               source_types={n: blocks[n].source for n in kinds})


def export(model, path, weights="auto", compute="fp32"):
    export_loaded(model, path, ExportOptions(max_context=128, dhsa=None, use_heads=False,
                                             weights=WeightOptions(weights, compute)),
                  log=lambda m: None)
    return path


def logprobs(path) -> np.ndarray:
    return edgert.load(path).logprobs(IDS)


def linear_names(loaded) -> list[str]:
    return [n for n, t in loaded.state_dict.items()
            if t.dim() == 2 and "proj" in n]


@pytest.fixture(scope="module")
def mixed(loaded, tmp_path_factory):
    """4-bit linear layers, layer 0 in Q4_1's minimum form (a correction matmul), layer 1
    with integer zero points, and a Q4_1 tied embedding/lm_head (the embedding's nibble
    path), next to the fp32 export of the same dequantized weights."""
    kinds = {name: "Q4_1" if ".0." in name else 4 for name in linear_names(loaded)}
    kinds["model.embed_tokens.weight"] = "Q4_1"
    model = with_blocks(loaded, kinds)
    root = tmp_path_factory.mktemp("quant")
    return (model, export(model, root / "q_fp32"), export(model, root / "q_int8", compute="int8"),
            export(model, root / "fp32", weights="fp32"))


def test_fp32_compute_equals_the_dequantized_model(mixed):
    _, quantized, _, reference = mixed
    np.testing.assert_allclose(logprobs(quantized), logprobs(reference), atol=2e-4)


def test_int8_compute_stays_close(mixed):
    _, _, int8, reference = mixed
    diff = np.abs(logprobs(int8) - logprobs(reference))
    assert diff.max() < 0.25 and diff.mean() < 0.05


def test_8bit_weights_at_fp32_compute_expand_at_load(loaded, tmp_path):
    model = with_blocks(loaded, {"model.embed_tokens.weight": 8,
                                 **{n: 8 for n in linear_names(loaded)}})
    quantized = export(model, tmp_path / "q8", compute="fp32")
    reference = export(model, tmp_path / "fp32", weights="fp32")
    np.testing.assert_allclose(logprobs(quantized), logprobs(reference), atol=2e-4)
    graph = onnx.load(str(quantized / "model.ort.onnx"), load_external_data=False)
    assert not any(n.op_type == "MatMulNBits" for n in graph.graph.node)  # no fp32 8-bit kernel


def test_graphs_share_one_copy_of_the_quantized_weights(mixed):
    _, quantized, _, _ = mixed
    offsets = {}
    for file in ("model.onnx", "model.ort.onnx"):
        graph = onnx.load(str(quantized / file), load_external_data=False).graph
        names = {i.name for i in graph.initializer}
        assert "lm_head_t" not in names and not any(n.endswith(".MatMul.B") for n in names)
        ops = [n.op_type for n in graph.node]
        # per layer q/k/v as one (they read one input), o, gate/up as one, down; the lm_head
        assert ops.count("MatMulNBits") == 4 * 2 + 1
        assert ops.count("Split") == 2 * 2
        offsets[file] = {i.name: tuple((e.key, e.value) for e in i.external_data)
                         for i in graph.initializer if i.external_data}
    assert offsets["model.onnx"] == offsets["model.ort.onnx"]
    assert "model.embed_tokens.weight.q" in offsets["model.onnx"]
    assert "model.layers.0.self_attn.q_proj_k_proj_v_proj.weight.q" in offsets["model.onnx"]


def test_manifest_records_the_formats(mixed):
    _, quantized, _, reference = mixed
    section = edgert.load(quantized).manifest.quantization
    assert section["compute"] == "fp32" and section["accuracy_level"] == 1
    assert section["groups"]["q_proj"]["format"] in ("Q4_1", "Q4_test")
    assert section["groups"]["vocab"]["bits"] == 4
    assert section["groups"]["q_proj"]["requantized"] is False
    assert edgert.load(reference).manifest.quantization is None


def test_q4_requantizes_a_float_model_and_reports_the_error(loaded):
    blocks, report = plan_quantization(loaded, WeightOptions("q4"))
    assert blocks["model.layers.0.self_attn.q_proj.weight"].bits == 4
    assert blocks["model.embed_tokens.weight"].bits == 8  # the vocab stays 8-bit at q4
    row = report["model.layers.0.mlp.up_proj.weight"]
    assert row["requantized"] and 0 < row["rms"] < row["max"]
    assert not any("norm" in name for name in blocks)
    assert plan_quantization(loaded, WeightOptions("auto")) == ({}, {})  # fp32 source


def test_q4_keeps_fast_forms_and_requantizes_the_minimum_form(loaded):
    """At q4 a Q4_1 (minimum) block is requantized to integer zero points, which run with no
    correction; Q4_0 (symmetric) blocks stay."""
    model = with_blocks(loaded, {"model.layers.0.mlp.down_proj.weight": "Q4_1",
                                 "model.layers.1.mlp.down_proj.weight": "Q4_0"})
    blocks, report = plan_quantization(model, WeightOptions("q4"))
    assert blocks["model.layers.0.mlp.down_proj.weight"].form == "zero_point"
    assert report["model.layers.0.mlp.down_proj.weight"]["requantized"]
    assert blocks["model.layers.1.mlp.down_proj.weight"].source == "Q4_0"


def test_auto_keeps_exact_blocks(loaded):
    model = with_blocks(loaded, {"model.layers.1.mlp.down_proj.weight": 4})
    blocks, report = plan_quantization(model, WeightOptions("auto"))
    assert list(blocks) == ["model.layers.1.mlp.down_proj.weight"]
    assert blocks["model.layers.1.mlp.down_proj.weight"] is \
        model.quantized["model.layers.1.mlp.down_proj.weight"]
    assert report["model.layers.1.mlp.down_proj.weight"]["requantized"] is False


def test_initializer_names_map_to_transformers_weights(loaded):
    config = loaded.config
    assert hf_weight_name("layers.3.self_attn.q_proj.MatMul.B", config) == \
        "model.layers.3.self_attn.q_proj.weight"
    assert hf_weight_name("lm_head_t", config) == "model.embed_tokens.weight"
    untied = dataclasses.replace(config, tie_word_embeddings=False)
    assert hf_weight_name("lm_head_t", untied) == "lm_head.weight"
    assert hf_weight_name("heads.blocks.0.0.linear.weight", config) is None


@pytest.mark.parametrize("field, value", [("weights", "q3"), ("compute", "fp16")])
def test_bad_options_are_named(field, value):
    with pytest.raises(ConfigError, match=f"--{field}"):
        WeightOptions(**{field: value})


def test_tvm_runs_a_quantized_artifact_as_ort_does_at_fp32_compute(mixed, tmp_path):
    """The llvm build of a quantized artifact scores like ONNX Runtime at --compute fp32, and
    every quantized matmul runs in edgert's dequantizing kernel: no weight of the module is
    expanded to fp32, and the Q4_1 correction is part of the kernel's block bias."""
    pytest.importorskip("tvm")
    import shutil

    from edgert.passes.build import compile_artifact
    from edgert.passes.quantized_import import take_matmul_nbits

    art = tmp_path / "q"
    shutil.copytree(mixed[1], art)
    compile_artifact(art, "llvm", dump_ir=tmp_path / "ir", log=lambda m: None)
    imported = (tmp_path / "ir" / "decoder-0-import.py").read_text()
    assert "edgert_dequantize_4" in imported
    graph = onnx.load(str(art / "model.onnx"))
    def corrections():  # the Q4_1 layer's correction matmuls (not the embedding's Gather)
        return [n for n in graph.graph.node if n.op_type == "MatMul" and "Correction" in n.name]

    assert corrections()
    take_matmul_nbits(graph)
    assert not corrections()
    built = (tmp_path / "ir" / "decoder-2-legalize.py").read_text()
    assert "edgert_quant_matmul4" in built and "edgert_dequantize" not in built
    tvm_engine = edgert.load(art, backend="tvm")
    np.testing.assert_allclose(tvm_engine.logprobs(IDS), logprobs(mixed[1]), atol=2e-4)
    want = edgert.load(art).generate("hello there", max_new_tokens=8, chat=False,
                                     medusa=False).output_ids
    assert tvm_engine.generate("hello there", max_new_tokens=8, chat=False,
                               medusa=False).output_ids == want


def test_int8_compute_runs_the_minimum_as_rows(mixed):
    """At int8 compute the Q4_1 layer's matmuls read [x, blocksum(x)] (no correction matmul,
    edgert.model.block_quant.MinimumRows); the Q4_1 vocabulary keeps the exact correction (its
    embedding reads the blocks); the manifest records how far the minimums moved."""
    model, fp32_compute, int8, _ = mixed
    graph = onnx.load(str(int8 / "model.ort.onnx"), load_external_data=False).graph
    k = model.config.hidden_size
    widened = [n for n in graph.node if n.op_type == "MatMulNBits"
               and n.input[0].endswith("/with_blocksums")]
    assert len(widened) == 4  # layer 0's q/k/v, o, gate/up, down: layer 1 has zero points
    qkv = next(n for n in widened if "q_proj" in n.name)
    assert {a.name: a.i for a in qkv.attribute}["K"] == k + k // 32
    # the one correction matmul left is the lm_head's
    assert [n.input[1] for n in graph.node if n.op_type == "MatMul"] == [
        "model.embed_tokens.weight.correction"]
    groups = edgert.load(int8).manifest.quantization["groups"]
    assert 0 < groups["q_proj"]["minimum_rows"]["max_error"] < 0.05
    assert "minimum_rows" not in groups["vocab"]
    exact = edgert.load(fp32_compute).manifest.quantization["groups"]
    assert not any("minimum_rows" in g for g in exact.values())


def test_tvm_runs_an_int8_artifact_with_the_minimum_rows_in_the_block_bias(mixed, tmp_path):
    """TVM computes in fp32: the int8 artifact's minimum rows fold into its kernel's block
    bias, scoring as the dequantized model up to the moved minimums."""
    pytest.importorskip("tvm")
    import shutil

    from edgert.passes.build import compile_artifact

    art = tmp_path / "q"
    shutil.copytree(mixed[2], art)
    compile_artifact(art, "llvm", dump_ir=tmp_path / "ir", log=lambda m: None)
    built = (tmp_path / "ir" / "decoder-2-legalize.py").read_text()
    assert "edgert_quant_matmul4" in built and "edgert_dequantize" not in built
    tvm_logprobs = edgert.load(art, backend="tvm").logprobs(IDS)
    reference = logprobs(mixed[3])
    diff = np.abs(tvm_logprobs - reference)
    assert diff.max() < 0.05


@pytest.mark.parametrize("target, ext", [("cuda", "cu"), ("opencl", "cl"), ("metal", "metal"),
                                         ("webgpu", "wgsl")])
def test_gpu_builds_of_a_quantized_artifact_carry_the_quantized_kernel(mixed, tmp_path, target,
                                                                       ext):
    pytest.importorskip("tvm")
    import shutil

    from edgert.passes.build import compile_artifact

    art = tmp_path / "q"
    shutil.copytree(mixed[1], art)
    record = compile_artifact(art, target, log=lambda m: None)
    source = (art / "tvm" / target / f"decoder.{ext}").read_text()
    assert "edgert_quant_matmul4" in source
    if target == "webgpu":
        assert not any("i64" in (art / "tvm" / target / f).read_text() for f in record["files"]
                       if f.endswith(".wgsl"))


@pytest.fixture(scope="module")
def heads_dir(tiny_dir, tmp_path_factory):
    from tests.tiny_model import save_random_heads

    path = tmp_path_factory.mktemp("quant_heads") / "heads"
    save_random_heads(tiny_dir, path, seed=0, std=0.3)
    return path


@pytest.fixture(scope="module")
def vocab_heads_dir(tiny_dir, tmp_path_factory):
    """Token-conditioned heads scoring 64 of the vocabulary (an output vocab: their
    projection is lm_head columns)."""
    from tests.tiny_model import save_random_heads

    vocab = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:64]
    path = tmp_path_factory.mktemp("quant_vocab_heads") / "heads"
    save_random_heads(tiny_dir, path, seed=0, std=0.3, vocab_ids=vocab, output_vocab=64,
                      condition="token")
    return path


@pytest.mark.parametrize("heads", ["heads_dir", "vocab_heads_dir"])
@pytest.mark.parametrize("compute, atol", [("fp32", 0.05), ("int8", 0.15)])
def test_medusa_heads_are_stored_8bit_and_score_as_fp32(loaded, heads, tmp_path, compute,
                                                       atol, request):
    """The heads' own matmuls (Gemm with bias, the projection MatMul) become 8-bit; their
    top-k logits stay within the 8-bit rounding of the fp32 heads'. An output-vocab
    projection reads the lm_head's own blocks (gathered rows): no copy in medusa.onnx."""
    heads_dir = request.getfixturevalue(heads)

    def export_heads(weights, name):
        out = tmp_path / name
        export_loaded(loaded, out, ExportOptions(max_context=128, dhsa=None, heads=heads_dir,
                                                 medusa_topk=4,
                                                 weights=WeightOptions(weights, compute)),
                      log=lambda m: None)
        return out

    quantized, reference = export_heads("q8", "q8"), export_heads("fp32", "fp32")
    graph = onnx.load(str(quantized / "medusa.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "Gemm" and n.input[1].startswith("heads.") for n in graph.node
                   if compute == "int8")
    assert not any(i.name.startswith("medusa_proj_t") for i in graph.initializer)
    if heads == "vocab_heads_dir":  # the projection gathers the lm_head's rows
        assert any(n.op_type == "Gather" and n.input[0].startswith("model.embed_tokens.weight")
                   and n.input[1] == "heads.vocab_ids" for n in graph.node)
    assert edgert.load(quantized).manifest.quantization["groups"]["medusa_heads"]["bits"] == 8
    hidden = np.random.default_rng(0).standard_normal((3, loaded.config.hidden_size))
    roots = np.array([5, 9, 200])
    want = edgert.load(reference).head_candidates(hidden, roots)[1]
    got = edgert.load(quantized).head_candidates(hidden, roots)[1]
    np.testing.assert_allclose(np.sort(got, axis=-1), np.sort(want, axis=-1), atol=atol)


def test_output_vocab_heads_over_a_q4_1_lm_head(loaded, vocab_heads_dir, tmp_path):
    """The gathered projection keeps the lm_head's Q4_1 form: its rows' correction (the
    blocks' minimum) is gathered too."""
    pytest.importorskip("gguf")
    model = with_blocks(loaded, {"model.embed_tokens.weight": "Q4_1"})

    def export_heads(weights, name):
        out = tmp_path / name
        export_loaded(model, out, ExportOptions(max_context=128, dhsa=None,
                                                heads=vocab_heads_dir, medusa_topk=4,
                                                weights=WeightOptions(weights, "fp32")),
                      log=lambda m: None)
        return out

    quantized, reference = export_heads("auto", "q"), export_heads("fp32", "fp32")
    graph = onnx.load(str(quantized / "medusa.onnx"), load_external_data=False).graph
    assert any(n.op_type == "Gather" and n.input[0].endswith(".correction")
               and n.input[1] == "heads.vocab_ids" for n in graph.node)
    hidden = np.random.default_rng(0).standard_normal((3, loaded.config.hidden_size))
    roots = np.array([5, 9, 200])
    want = edgert.load(reference).head_candidates(hidden, roots)[1]
    got = edgert.load(quantized).head_candidates(hidden, roots)[1]
    np.testing.assert_allclose(np.sort(got, axis=-1), np.sort(want, axis=-1), atol=0.05)
