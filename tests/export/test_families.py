"""Every supported family, exported from a tiny transformers model (HF directory) and from a
GGUF written from it: logits equal transformers' (atol 1e-4) for prefill, decode and a tree
step, in both graphs (ONNX Runtime's and the portable one), and greedy ids equal
transformers' ``generate`` for 32 tokens."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import edgert
from edgert.export.exporter import ExportOptions, export_model
from edgert.runtime.steps import causal_mask
from tests.export.test_graph_numerics import (
    ATOL,
    PARENTS,
    assert_tree_rows,
    reference_logits,
    run_step,
    tree_mask_and_depth,
)
from tests.families import FAMILIES, build_family_dir, write_family_gguf
from tests.runtime.test_engine import hf_greedy

PREFIX = [5, 77, 301, 12, 9, 150, 42]
TREE = [40, 41, 42, 43, 44, 45]
CAPACITY = 256
SOURCES = ("hf", "gguf")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    from tests.tiny_model import load_reference

    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf_dir = build_family_dir(name, root / "hf")
    gguf_path = write_family_gguf(name, hf_dir, root / f"{name}.gguf")
    artifacts = {}
    for source, path in (("hf", hf_dir), ("gguf", gguf_path)):
        artifacts[source] = export_model(str(path), root / f"art-{source}",
                                         ExportOptions(max_context=CAPACITY, dhsa=None),
                                         log=lambda m: None)
    return name, artifacts, load_reference(hf_dir)


def check_steps(engine, reference, name: str) -> None:
    """Prefill, one decode token, then a tree step: every logit row against transformers."""
    engine.cache.reset()
    out = run_step(engine, PREFIX, list(range(len(PREFIX))), causal_mask(len(PREFIX)))
    np.testing.assert_allclose(out.logits, reference_logits(reference, PREFIX), atol=ATOL,
                               err_msg=f"{name} prefill")
    engine.cache.advance(len(PREFIX))
    out = run_step(engine, [TREE[0]], [len(PREFIX)], causal_mask(1))
    np.testing.assert_allclose(out.logits[0], reference_logits(reference, PREFIX + TREE[:1])[-1],
                               atol=ATOL, err_msg=f"{name} decode")
    mask, depth = tree_mask_and_depth(PARENTS)
    out = run_step(engine, TREE, list(len(PREFIX) + depth), mask)
    assert_tree_rows(out.logits, reference, PREFIX, TREE, name)


@pytest.mark.parametrize("source", SOURCES)
def test_steps_match_transformers(family, source):
    name, artifacts, reference = family
    check_steps(edgert.load(artifacts[source]), reference, name)


def test_tvm_build_matches_transformers(family, tmp_path):
    """The llvm TVM build (edgert's tree-attention kernel, soft-capped for Gemma 2)."""
    pytest.importorskip("tvm")
    import shutil

    from edgert.passes.build import compile_artifact

    name, artifacts, reference = family
    art = shutil.copytree(artifacts["hf"], tmp_path / "art")
    compile_artifact(art, "llvm")
    check_steps(edgert.load(art, backend="tvm"), reference, name)


def test_portable_graph_matches_transformers(family):
    """model.onnx (standard ops, what TVM imports): prefill, then a tree step on its presents."""
    name, artifacts, reference = family
    art = artifacts["hf"]
    manifest = edgert.load(art).manifest
    session = ort.InferenceSession(str(art / "model.onnx"))
    kv = manifest.kv_cache
    feeds = {"input_ids": np.array([PREFIX]), "position_ids": np.arange(len(PREFIX))[None],
             "tree_mask": causal_mask(len(PREFIX)),
             "logits_index": np.arange(len(PREFIX), dtype=np.int64)}
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_")]
    for past in past_names:
        feeds[past] = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), dtype=np.float32)
    outputs = session.run(None, feeds)
    np.testing.assert_allclose(outputs[0][0], reference_logits(reference, PREFIX), atol=ATOL)
    mask, depth = tree_mask_and_depth(PARENTS)
    feeds = {"input_ids": np.array([TREE]), "position_ids": (len(PREFIX) + depth)[None],
             "tree_mask": mask, "logits_index": np.arange(len(TREE), dtype=np.int64),
             **dict(zip(past_names, outputs[2:]))}
    logits = session.run(["logits"], feeds)[0][0]
    assert_tree_rows(logits, reference, PREFIX, TREE, name)


@pytest.mark.parametrize("source", SOURCES)
def test_greedy_matches_transformers_generate(family, source):
    name, artifacts, reference = family
    engine = edgert.load(artifacts[source])
    result = engine.generate("Explain what a class is", max_new_tokens=32, speculative="off")
    eos = engine.manifest.tokenizer.eos_token_ids[0]
    expected = hf_greedy(reference, result.prompt_ids, 32, eos)
    assert result.output_ids == expected, name


def test_sliding_window_caps_the_context(tmp_path):
    """Mistral's window (512) is below its maximum (1024): export serves at most the window."""
    from edgert.errors import ConfigError

    hf_dir = build_family_dir("mistral", tmp_path / "hf")
    with pytest.raises(ConfigError, match="sliding-attention window"):
        export_model(str(hf_dir), tmp_path / "art", ExportOptions(max_context=600, dhsa=None),
                     log=lambda m: None)


def test_self_distillation_refuses_non_llama_layers(family):
    """Head training runs the backbone as a transformers Llama: a family whose layers differ
    is refused by name instead of training on a wrong model."""
    from edgert.errors import ConfigError
    from edgert.model.sources import load_model
    from edgert.train.distill import build_hf_model

    name, artifacts, _ = family
    loaded = load_model(str(artifacts["hf"].parent / "hf"))
    if name in ("llama3", "mistral"):
        assert build_hf_model(loaded) is not None
    else:
        with pytest.raises(ConfigError, match=loaded.architecture):
            build_hf_model(loaded)
