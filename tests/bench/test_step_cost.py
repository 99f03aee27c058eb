"""bench.step_cost's graph variants: the Q4_1 minimum removed, in either form, still runs."""

from __future__ import annotations

import onnx
import pytest

from bench.step_cost import GraphTimer, without_correction
from edgert.artifact.io import load_manifest
from edgert.model.sources import load_model
from tests.export.test_quantize import export, linear_names, with_blocks


@pytest.mark.parametrize("compute, rows_per_layer", [("int8", 4), ("fp32", 0)])
def test_minimum_removed_in_either_form(tiny_dir, tmp_path, compute, rows_per_layer):
    """Minimum rows (int8: each matmul then reads x, its weight cut to x's blocks) and
    correction matmuls (the lm_head's; every Q4_1 matmul at fp32) leave; the graph runs."""
    loaded = load_model(str(tiny_dir))
    model = with_blocks(loaded, {**{n: "Q4_1" for n in linear_names(loaded)},
                                 "model.embed_tokens.weight": "Q4_1"})
    layers = model.config.num_hidden_layers
    path = export(model, tmp_path / compute, compute=compute)
    graph = onnx.load(str(path / "model.ort.onnx"))
    widened = [n for n in graph.graph.node if n.input and n.input[0].endswith("/with_blocksums")]
    assert len(widened) == rows_per_layer * layers
    assert without_correction(graph) == 4 * layers + 1  # per layer qkv, o, gate/up, down; lm_head
    assert not any(n.op_type in ("ReduceSum", "MatMul")
                   or n.output[0].endswith("/with_blocksums") for n in graph.graph.node)
    timer = GraphTimer(graph.SerializeToString(), load_manifest(path), past=4, threads=1,
                       token=7)
    assert timer.ms_per_call(1, 2) > 0
