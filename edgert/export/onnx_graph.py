"""torch decoder -> ONNX decode graphs (opset 17), one per attention variant, sharing weights.

``model.onnx`` (portable, standard ops) and ``model.ort.onnx`` (ONNX Runtime GQA) come from the
same weights; initializers are renamed after the node that reads them
(``layers.3.self_attn.q_proj.MatMul.B``) and both graphs point into one ``model.onnx.data``.

Memory stays bounded by about two copies of the fp32 weights, whatever the model's size
(protobuf cannot hold a message over 2 GiB, and three in-memory graphs of a 1B model would
not fit a laptop): each graph is traced to a file in a work directory, its weights written
there by torch, and loaded back as structure only (``TracedGraph``: initializers that point
into those files). ``save_graphs_sharing_weights`` then streams every large tensor, one at a
time, into the one shared data file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import external_data_helper

from edgert.artifact.manifest import WHOLE_BIAS_AXIS
from edgert.errors import EdgertError
from edgert.export.attention import fix_contrib_optional_inputs
from edgert.export.decoder import Decoder

OPSET = 17
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file
ALIGNMENT = 4096  # of each tensor's offset in the data file (page-aligned: mmap-friendly)
COPY_CHUNK = 64 << 20


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
        outputs=("logits", "hidden", *present, *model.attention.extra_outputs,
                 *(("features",) if model.features_output else ())),
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
        # ORT graph: the last axis is q (a tree mask) or T (a whole bias: shared cache)
        "tree_mask": {2: "q", 3: WHOLE_BIAS_AXIS if model.attention.shared_cache else "q"},
        "logits_index": {0: "n"},
        "logits": {1: "n"},
        "hidden": {1: "n"},
        **({"features": {1: "q"}} if model.features_output else {}),
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


def trace_decoder(model: Decoder, workdir: Path) -> onnx.ModelProto:
    """Export one decode step of ``model`` (its attention variant) to ``workdir``; returns the
    graph with its large initializers still in ``workdir``'s files (absolute locations)."""
    names = decoder_io_names(model)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "graph.onnx"
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example_inputs(model),
            str(path),
            input_names=list(names.inputs),
            output_names=list(names.outputs),
            dynamic_axes=_dynamic_axes(model, names),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
            custom_opsets={"com.microsoft": 1},
        )
    proto = onnx.load_model(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        if external_data_helper.uses_external_data(init):
            info = external_data_helper.ExternalDataInfo(init)
            _set_external(init, str((workdir / info.location).resolve()), info.offset or 0,
                          info.length)
    _readable_initializer_names(proto)
    fix_contrib_optional_inputs(proto.graph)
    proto.producer_name = "edgert"
    return proto


def _set_external(init: onnx.TensorProto, location: str, offset: int,
                  length: int | None) -> None:
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        init.external_data.add(key=key, value=value)


def _tensor_bytes(init: onnx.TensorProto) -> int:
    if external_data_helper.uses_external_data(init):
        info = external_data_helper.ExternalDataInfo(init)
        if info.length is not None:
            return int(info.length)
        return Path(info.location).stat().st_size - int(info.offset or 0)
    if init.HasField("raw_data"):
        return len(init.raw_data)
    return init.ByteSize()


class _SharedDataFile:
    """Appends tensors to one data file, page-aligned, once per name: a tensor another graph
    already wrote (same name, dtype and shape) is referenced, not written again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.written: dict[str, onnx.TensorProto] = {}  # name -> a reference to it

    def close(self) -> None:
        self.file.close()

    def place(self, init: onnx.TensorProto, graph: str) -> None:
        """Point ``init`` into the data file, writing its bytes unless already there."""
        ref = self.written.get(init.name)
        if ref is not None:
            if ref.data_type != init.data_type or list(ref.dims) != list(init.dims):
                raise EdgertError(f"graph {graph}: initializer {init.name} differs from the one "
                                  "already saved; the graphs were exported from other weights")
            init.CopyFrom(ref)
            return
        offset = -self.file.tell() % ALIGNMENT + self.file.tell()
        self.file.seek(offset)
        length = self._write_bytes(init)
        _set_external(init, self.path.name, offset, length)
        self.written[init.name] = onnx.TensorProto()
        self.written[init.name].CopyFrom(init)

    def _write_bytes(self, init: onnx.TensorProto) -> int:
        if not external_data_helper.uses_external_data(init):
            if not init.HasField("raw_data"):  # typed fields (float_data, ...): to raw bytes
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init),
                                                           init.name))
            self.file.write(init.raw_data)
            return len(init.raw_data)
        info = external_data_helper.ExternalDataInfo(init)
        length = _tensor_bytes(init)
        with open(info.location, "rb") as source:
            source.seek(int(info.offset or 0))
            left = length
            while left:
                chunk = source.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise EdgertError(f"{info.location} ended early while saving {init.name}")
                self.file.write(chunk)
                left -= len(chunk)
        return length


def save_graphs_sharing_weights(graphs: dict[str, onnx.ModelProto], directory: Path,
                                data_name: str) -> list[str]:
    """Save several graphs whose large initializers are the same tensors into one data file.

    Every initializer of at least ``EXTERNAL_THRESHOLD`` bytes goes to ``data_name``, once
    per name (graphs that share a weight share its bytes; a later graph's tensor of the same
    name must have the same dtype and shape); the tensors stream from the traced graphs'
    work files one at a time. Returns the file names written.
    """
    data = _SharedDataFile(directory / data_name)
    written = [data_name]
    try:
        for name, graph in graphs.items():
            for init in graph.graph.initializer:
                if _tensor_bytes(init) >= EXTERNAL_THRESHOLD:
                    data.place(init, name)
            onnx.save_model(graph, str(directory / name))
            written.append(name)
    finally:
        data.close()
    return written
