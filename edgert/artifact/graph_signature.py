"""What an ONNX graph file declares about itself: its inputs and outputs (name, dtype, shape)
and the head counts of its first GroupQueryAttention node, read straight from the protobuf.

The runtime does not depend on the ``onnx`` package, so this is a minimal reader of
protobuf's wire format that walks ``ModelProto.graph`` and decodes only the graph's
``input``/``output`` value infos and the attributes of one attention node, skipping the rest
by length: a few milliseconds for SmolLM2's graphs (the weights are in the external data
file). A load compares the result with the manifest (``artifact.io.check_graph_files``).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

# onnx.TensorProto.DataType -> the manifest's dtype names
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32",
          7: "int64", 8: "string", 9: "bool", 10: "float16", 11: "float64", 12: "uint32",
          13: "uint64", 16: "bfloat16"}
ATTENTION_OP = b"GroupQueryAttention"

# field numbers (onnx/onnx.proto)
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 11, 12
_NODE_OP_TYPE, _NODE_ATTRIBUTE = 4, 5
_ATTR_NAME, _ATTR_INT = 1, 3
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_ELEM_TYPE, _TENSOR_SHAPE = 1, 2
_SHAPE_DIM = 1
_DIM_VALUE, _DIM_PARAM = 1, 2


class MalformedGraph(ValueError):
    """The bytes are not a well-formed ONNX ModelProto."""


@dataclass(frozen=True)
class TensorDecl:
    dtype: str
    shape: list[int | str] | None  # None: no shape declared; "?" an unnamed dimension


@dataclass(frozen=True)
class GraphSignature:
    inputs: dict[str, TensorDecl]
    outputs: dict[str, TensorDecl]
    # int attributes of the first GroupQueryAttention node (num_heads, kv_num_heads, ...);
    # empty when the graph has none
    attention: dict[str, int] = field(default_factory=dict)


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos < end and buf[pos] < 0x80:  # the common one-byte case
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedGraph("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int):
    """(field number, wire type, value) of a message in ``buf[start:end]``: the int of a
    varint, the (start, end) span of a length-delimited field, None for fixed-size ones."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MalformedGraph("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise MalformedGraph(f"wire type {wire}")
        if pos > end:
            raise MalformedGraph("a field runs past the end of its message")
        yield number, wire, value


def _text(buf: bytes, span: tuple[int, int]) -> str:
    try:
        return buf[span[0]:span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedGraph("a name is not UTF-8") from None


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _spans(buf: bytes, span: tuple[int, int], number: int):
    """The spans of the length-delimited occurrences of field ``number``."""
    for n, wire, value in _fields(buf, *span):
        if n == number and wire == 2:
            yield value


def _tensor_decl(buf: bytes, span: tuple[int, int]) -> tuple[str, TensorDecl | None]:
    """A ValueInfoProto -> (name, its tensor type; None for a non-tensor type)."""
    name, decl = "", None
    for n, wire, value in _fields(buf, *span):
        if n == _VALUE_NAME and wire == 2:
            name = _text(buf, value)
        elif n == _VALUE_TYPE and wire == 2:
            for tensor in _spans(buf, value, _TYPE_TENSOR):
                elem, shape = 0, None
                for m, w, v in _fields(buf, *tensor):
                    if m == _TENSOR_ELEM_TYPE and w == 0:
                        elem = v
                    elif m == _TENSOR_SHAPE and w == 2:
                        shape = [_dimension(buf, dim) for dim in _spans(buf, v, _SHAPE_DIM)]
                decl = TensorDecl(DTYPES.get(elem, f"type{elem}"), shape)
    return name, decl


def _dimension(buf: bytes, span: tuple[int, int]) -> int | str:
    dim: int | str = "?"
    for n, wire, value in _fields(buf, *span):
        if n == _DIM_VALUE and wire == 0:
            dim = _signed(value)
        elif n == _DIM_PARAM and wire == 2:
            dim = _text(buf, value)
    return dim


def _attention_attributes(buf: bytes, span: tuple[int, int]) -> dict[str, int] | None:
    """A NodeProto's int attributes when it is a GroupQueryAttention node, else None."""
    op_type, ints = None, {}
    for n, wire, value in _fields(buf, *span):
        if n == _NODE_OP_TYPE and wire == 2:
            op_type = buf[value[0]:value[1]]
        elif n == _NODE_ATTRIBUTE and wire == 2:
            name, number = None, None
            for m, w, v in _fields(buf, *value):
                if m == _ATTR_NAME and w == 2:
                    name = _text(buf, v)
                elif m == _ATTR_INT and w == 0:
                    number = _signed(v)
            if name is not None and number is not None:
                ints[name] = number
    return ints if op_type == ATTENTION_OP else None


def parse_signature(buf: bytes | mmap.mmap) -> GraphSignature:
    """The signature of a serialized ModelProto; MalformedGraph when it is not one."""
    inputs: dict[str, TensorDecl] = {}
    outputs: dict[str, TensorDecl] = {}
    attention: dict[str, int] | None = None
    graphs = list(_spans(buf, (0, len(buf)), _MODEL_GRAPH))
    if not graphs:
        raise MalformedGraph("no graph")
    for graph in graphs:  # protobuf merges repeated occurrences of a message field
        # the next mention of the attention op: only the node holding it is decoded
        mention = buf.find(ATTENTION_OP, *graph)
        for n, wire, value in _fields(buf, *graph):
            if wire != 2:
                continue
            if n == _GRAPH_NODE:
                if attention is None and 0 <= mention < value[1]:
                    if mention >= value[0]:
                        attention = _attention_attributes(buf, value)
                    mention = buf.find(ATTENTION_OP, value[1], graph[1])
            elif n in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                name, decl = _tensor_decl(buf, value)
                if decl is not None:
                    (inputs if n == _GRAPH_INPUT else outputs)[name] = decl
    return GraphSignature(inputs, outputs, attention or {})


def read_signature(path: Path) -> GraphSignature:
    """The signature of the ONNX file at ``path``; OSError or MalformedGraph. The file is
    mapped, not read: the fields skipped (initializers stored inside it) are never touched."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise MalformedGraph("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return parse_signature(buf)
