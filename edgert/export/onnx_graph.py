"""torch decoder -> ONNX decode graphs (opset 17), one per attention variant, sharing weights.

``model.onnx`` (portable, standard ops) and ``model.ort.onnx`` (ONNX Runtime GQA) come from the
same weights; initializers are renamed after the node that reads them
(``layers.3.self_attn.q_proj.MatMul.B``) and both graphs point into one ``model.onnx.data``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import external_data_helper

from edgert.errors import EdgertError
from edgert.export.attention import fix_contrib_optional_inputs
from edgert.export.decoder import Decoder

OPSET = 17
EXTERNAL_THRESHOLD = 1024
MAX_INLINE_BYTES = 1 << 30  # protobuf's 2 GiB limit, with margin


@dataclass(frozen=True)
class GraphIO:
    """Names of a decode graph's inputs and outputs, in order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def decoder_io_names(model: Decoder) -> GraphIO:
    n = model.config.num_hidden_layers
    past = [f"past_{kind}_{i}" for i in range(n) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(n) for kind in ("key", "value")]
    return GraphIO(
        inputs=("input_ids", "position_ids", "tree_mask", "logits_index",
                *model.attention.extra_inputs, *past),
        outputs=("logits", "hidden", *present, *model.attention.extra_outputs),
    )


def example_inputs(model: Decoder, q: int = 3, past: int = 2) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    if model.attention.prefill_only:
        q, past = model.example_length, model.example_past
    ids = torch.zeros((1, q), dtype=torch.int64)
    pos = torch.arange(past, past + q, dtype=torch.int64).unsqueeze(0)
    mask = torch.zeros((1, 1, q, q), dtype=torch.float32)
    logits_index = torch.tensor([q - 1], dtype=torch.int64)
    capacity = model.attention.shared_cache or model.attention.prefill_only
    length = past + q + 2 if capacity else past
    kv = torch.zeros((1, cfg.num_key_value_heads, length, cfg.head_dim), dtype=torch.float32)
    extra = model.attention.example_extra(q, past)
    return (ids, pos, mask, logits_index, *extra, *([kv] * (2 * cfg.num_hidden_layers)))


def _dynamic_axes(model: Decoder, names: GraphIO) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {1: "q"},
        "position_ids": {1: "q"},
        "tree_mask": {2: "q", 3: "q"},
        "logits_index": {0: "n"},
        "logits": {1: "n"},
        "hidden": {1: "n"},
    }
    prefill = model.attention.prefill_only
    cache_axis = "capacity" if model.attention.shared_cache or prefill else "past"
    present_axis = "capacity" if model.attention.shared_cache or prefill else "q"
    if prefill:
        del axes["tree_mask"]
        axes["past_chunk_starts"] = {0: "past"}
        axes["chunk_starts"] = {0: "q"}
    for name in names.inputs:
        if name.startswith(("past_key_", "past_value_")):
            axes[name] = {2: cache_axis}
    for name in names.outputs:
        if name.startswith(("present_key_", "present_value_")):
            axes[name] = {2: present_axis}
    return axes


def _readable_initializer_names(model: onnx.ModelProto) -> None:
    """Rename exporter-generated initializers (``onnx::MatMul_465``) after their reader."""
    graph = model.graph
    renames: dict[str, str] = {}
    taken = {init.name for init in graph.initializer}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name.startswith("onnx::") and name in taken and name not in renames:
                base = node.name.strip("/").replace("/", ".")
                renames[name] = f"{base}.{'AB'[slot] if slot < 2 else slot}"
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]


def trace_decoder(model: Decoder) -> onnx.ModelProto:
    """Export one decode step of ``model`` (its attention variant) to an in-memory ONNX model."""
    names = decoder_io_names(model)
    buffer = io.BytesIO()
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example_inputs(model),
            buffer,
            input_names=list(names.inputs),
            output_names=list(names.outputs),
            dynamic_axes=_dynamic_axes(model, names),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
            custom_opsets={"com.microsoft": 1},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _readable_initializer_names(proto)
    fix_contrib_optional_inputs(proto.graph)
    proto.producer_name = "edgert"
    return proto


def save_graphs_sharing_weights(graphs: dict[str, onnx.ModelProto], directory: Path,
                                data_name: str) -> list[str]:
    """Save several graphs whose large initializers are the same tensors into one data file.

    The first graph writes ``data_name``; later graphs reference the same offsets, which is
    checked tensor by tensor (name, dtype, shape); tensors only a later graph has stay inside
    that graph's file. Returns the file names written.
    """
    first_name, first = next(iter(graphs.items()))
    onnx.save_model(first, str(directory / first_name), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data_name,
                    size_threshold=EXTERNAL_THRESHOLD)
    saved = onnx.load_model(str(directory / first_name), load_external_data=False)
    external = {init.name: init for init in saved.graph.initializer
                if external_data_helper.uses_external_data(init)}
    written = [first_name, data_name]
    for name, graph in list(graphs.items())[1:]:
        inline_bytes = 0
        for init in graph.graph.initializer:
            ref = external.get(init.name)
            if ref is None:  # a tensor of this graph only (e.g. Medusa head blocks): inline
                inline_bytes += init.ByteSize()
                continue
            if ref.data_type != init.data_type or list(ref.dims) != list(init.dims):
                raise EdgertError(f"graph {name}: initializer {init.name} differs from "
                                  f"{first_name}'s; the graphs were exported from other weights")
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.extend(ref.external_data)
        if inline_bytes > MAX_INLINE_BYTES:
            raise EdgertError(f"graph {name} carries {inline_bytes / 2**20:.0f} MiB of weights "
                              f"of its own (limit {MAX_INLINE_BYTES / 2**20:.0f} MiB); use heads "
                              "with a shared projection")
        onnx.save_model(graph, str(directory / name))
        written.append(name)
    return written
