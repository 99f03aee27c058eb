"""The artifact manifest (``edgert.json``): the contract between export, compile and runtime.

See docs/artifact.md for every field. ``Manifest.from_dict`` rejects unknown fields, a wrong
format or version, values of the wrong type or out of range, and a ``config``/``kv_cache``
that contradicts the graphs' specs, each with a message naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgert.errors import ArtifactError, ConfigError
from edgert.model.config import DecoderConfig, reject_unknown_fields

FORMAT = "edgert-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "edgert.json"


class GraphKey(StrEnum):
    """Keys of ``Manifest.graphs``; a decoder graph's key is also its attention variant
    (``GraphSpec.attention``, ``edgert.export.attention.ATTENTION_VARIANTS``)."""

    PORTABLE = "portable"  # model.onnx: standard ONNX ops (what TVM imports)
    ORT_GQA = "ort_gqa"  # model.ort.onnx: ONNX Runtime GroupQueryAttention over the cache
    DHSA = "dhsa"  # model.dhsa.onnx: the DHSA sparse prefill (long prompts)
    MEDUSA = "medusa"  # medusa.onnx: the Medusa heads' top-k
    DRAFT = "draft"  # draft.onnx: the EAGLE-style draft layer over its own KV cache
    DRAFT_PORTABLE = "draft_portable"  # draft.portable.onnx: the draft layer for TVM


# ``draft.tree`` (written by `edgert tune-tree`): the draft layer's dynamic tree
# (``edgert.speculative.dynamic_tree.DraftTreeParams``)
DRAFT_TREE_FIELDS = ("depth", "beam", "topk", "budget")

# the KV cache's element types (numpy names) and their sizes in bytes
KV_DTYPES = {"float32": 4, "float16": 2}
REEXPORT = "re-export the artifact"

# the last axis of the ORT graph's ``tree_mask`` when it also takes a bias over the cached
# entries (several sequences sharing one cache); older graphs name it "q" (new tokens only)
WHOLE_BIAS_AXIS = "mask_len"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, symbolic shape, dtype and what it means."""

    name: str
    shape: list[int | str]
    dtype: str
    meaning: str

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "graph tensor.") -> TensorSpec:
        return cls(**strict_fields(cls, data, where))


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph in the artifact."""

    file: str
    attention: str  # attention variant, see edgert.export.attention.ATTENTION_VARIANTS
    shared_cache: bool
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # the graph's attention runs at least this many query rows: a lone row is padded with an
    # uncommitted copy inside the graph (edgert.export.row_padding; int8-activation artifacts)
    min_attention_rows: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "graph.") -> GraphSpec:
        data = strict_fields(cls, data, where)
        for kind in ("inputs", "outputs"):
            data[kind] = [TensorSpec.from_dict(t, f"{where}{kind}[{i}].")
                          for i, t in enumerate(data[kind])]
        return cls(**data)


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]
    add_bos_token: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerSpec:
        return cls(**strict_fields(cls, data, "tokenizer."))


@dataclass(frozen=True)
class KVCacheSpec:
    """The runtime allocates, once at load, ``num_layers`` x {key, value} buffers of
    ``[1, num_kv_heads, capacity, head_dim]`` of ``dtype``."""

    capacity: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @property
    def bytes(self) -> int:
        itemsize = KV_DTYPES[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.capacity * self.head_dim * itemsize

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVCacheSpec:
        spec = cls(**strict_fields(cls, data, "kv_cache."))
        for name in ("capacity", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(spec, name) <= 0:
                raise ConfigError(f"kv_cache.{name} must be positive, got "
                                  f"{getattr(spec, name)}; {REEXPORT}")
        if spec.dtype not in KV_DTYPES:
            raise ConfigError(f"kv_cache.dtype {quote(repr(spec.dtype))} is not a KV cache "
                              f"type edgert knows ({', '.join(KV_DTYPES)}); {REEXPORT}")
        return spec


def strict_fields(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` as the fields of dataclass ``cls``: a dict with none unknown or missing, each
    of its annotated type; ConfigError naming the field otherwise. ``where``: the fields'
    path prefix in the manifest ("kv_cache.", "" at the top)."""
    section = where.rstrip(".") or "the manifest"
    if not isinstance(data, dict):
        raise ConfigError(f"{section} must be a JSON object, got {_describe(data)}; "
                          f"{REEXPORT}")
    names, required = _field_names(cls)
    if not names.issuperset(data):
        reject_unknown_fields(cls, data, f"{MANIFEST_NAME} {section}")
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{section} lacks the field(s) {missing}; {REEXPORT}")
    check_field_types(cls, data, where)
    return dict(data)


def check_field_types(cls, data: dict[str, Any], where: str) -> None:
    """Every value of ``data`` is of its field's annotated type in dataclass ``cls`` (JSON's
    forms: a list for a tuple, a dict for a nested dataclass, an integer for a float);
    ConfigError naming the first part that is not, as a path from ``where`` + the field."""
    hints = _type_hints(cls)
    for name, value in data.items():
        if name in hints and (wrong := _mismatch(value, hints[name], f"{where}{name}")):
            path, hint, part = wrong
            raise ConfigError(f"field {quote(path, 120)} must be {_type_name(hint)}, got "
                              f"{_describe(part)}; {REEXPORT}")


@functools.cache
def _field_names(cls) -> tuple[frozenset[str], tuple[str, ...]]:
    """A dataclass's field names, and those without a default."""
    fields = dataclasses.fields(cls)
    return frozenset(f.name for f in fields), tuple(
        f.name for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # (resolving the annotations' strings: 50 us a call)


@functools.cache
def _parts(hint: Any) -> tuple[Any, tuple]:
    return typing.get_origin(hint), typing.get_args(hint)


@functools.cache
def _exact_types(hint: Any) -> frozenset[type]:
    """The types whose values are of ``hint`` whatever they hold (scalars; an int is a float
    too, a bool is not an int)."""
    if hint is float:
        return frozenset({float, int})
    if hint in (str, int, bool, type(None)):
        return frozenset({hint})
    origin, args = _parts(hint)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*map(_exact_types, args))
    return frozenset()


def _mismatch(value: Any, hint: Any, path: str) -> tuple[str, Any, Any] | None:
    """None when ``value`` is of type ``hint``; else (path, type, value) of its first part
    that is not (inside lists and dicts: the item, not the whole)."""
    if hint is Any or type(value) in _exact_types(hint):  # the common cases, at once
        return None
    origin, args = _parts(hint)
    if origin in (typing.Union, types.UnionType):
        if any(_mismatch(value, arm, path) is None for arm in args):
            return None
        for arm in args:  # a container of the arm's kind: name the item inside it
            kind = _parts(arm)[0]
            if kind in (list, tuple, dict) and isinstance(value, list if kind is tuple else kind):
                return _mismatch(value, arm, path)
        return path, hint, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return path, hint, value
        arm = args[0] if args else Any
        exact = _exact_types(arm)
        return next((wrong for i, item in enumerate(value) if type(item) not in exact
                     and (wrong := _mismatch(item, arm, f"{path}[{i}]"))), None)
    if origin is dict:
        if not isinstance(value, dict):
            return path, hint, value
        if not all(isinstance(key, str) for key in value):
            return path, hint, value
        return next((wrong for key, item in value.items()
                     if (wrong := _mismatch(item, args[1], f"{path}.{key}"))), None)
    return None if _is_scalar_of(value, hint) else (path, hint, value)


def _is_scalar_of(value: Any, hint: Any) -> bool:
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 1e-05 and 10000.0; it may read back 10000
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):  # built (and checked) by its own from_dict
        return isinstance(value, (dict, hint))
    return isinstance(value, hint) if isinstance(hint, type) else True


_TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
               str: ("a string", "strings"), bool: ("true or false", "booleans"),
               type(None): ("null", "nulls")}


def _type_name(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm, plural) for arm in args)
    if hint in _TYPE_NAMES:
        return _TYPE_NAMES[hint][plural]
    if origin in (list, tuple):
        inner = f" of {_type_name(args[0], True)}" if args and args[0] is not Any else ""
        return ("lists" if plural else "a list") + inner
    return "JSON objects" if plural else "a JSON object"


def quote(text: str, limit: int = 80) -> str:
    """``text`` as it is when plain, else its repr (a damaged manifest's strings may hold
    line breaks or control characters): for one-line messages."""
    return text if text.isprintable() and len(text) <= limit else repr(text)[:limit]


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    edgert_version: str
    architecture: str
    config: DecoderConfig
    dtype: str
    quantization: dict[str, Any] | None  # export.quantize.summarize; None: fp32 weights
    kv_cache: KVCacheSpec
    graphs: dict[str, GraphSpec]
    weights_file: str
    tokenizer: TokenizerSpec
    source: dict[str, str]
    files: dict[str, str]  # file name -> sha256
    medusa: dict[str, Any] | None = None
    tree: dict[str, Any] | None = None
    dhsa: dict[str, Any] | None = None
    draft: dict[str, Any] | None = None  # {topk, depth, output_vocab, kv_cache, ...}
    compiled: dict[str, Any] = field(default_factory=dict)
    # large file -> {"size", "sample_sha256"}: what a load checks (artifact.io.quick_checks)
    file_checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["config"] = self.config.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise ArtifactError(f"{MANIFEST_NAME} is not an edgert manifest "
                                f"(format={data.get('format')!r}); re-export the model")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format version {version} is not supported by this edgert "
                f"(supports {FORMAT_VERSION}); re-export it with `edgert export`")
        data = strict_fields(cls, data, "")
        try:
            if isinstance(data.get("config"), dict):
                check_field_types(DecoderConfig, data["config"], "config.")
            data["config"] = DecoderConfig.from_dict(data["config"])
            data["kv_cache"] = KVCacheSpec.from_dict(data["kv_cache"])
            data["graphs"] = {k: GraphSpec.from_dict(v, f"graphs.{k}.")
                              for k, v in data["graphs"].items()}
            data["tokenizer"] = TokenizerSpec.from_dict(data["tokenizer"])
            manifest = cls(**data)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{MANIFEST_NAME} is incomplete or malformed ({exc}); "
                                "re-export the model") from None
        manifest.check_consistency()
        return manifest

    def check_consistency(self) -> None:
        """The sections agree: ``config`` and ``kv_cache`` with the graphs' tensor specs (KV
        heads, head size and layers of every cache input, the vocabulary and hidden size of
        the logits and hidden outputs), ``medusa`` with its graph, ``file_checks`` well formed;
        ConfigError naming the field otherwise."""
        config, kv = self.config, self.kv_cache
        if kv.capacity > config.max_context:
            raise ConfigError(f"kv_cache.capacity={kv.capacity} exceeds the model's maximum "
                              f"context {config.max_context} (config); {REEXPORT}")
        for key, graph in self.graphs.items():
            self._check_graph(key, graph)
        for name, other in (("num_layers", "num_hidden_layers"),
                            ("num_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim")):
            if getattr(kv, name) != getattr(config, other):
                raise ConfigError(f"manifest kv_cache.{name}={getattr(kv, name)} contradicts "
                                  f"config {other}={getattr(config, other)}; {REEXPORT}")
        self._check_medusa()
        self._check_draft()
        for name, check in self.file_checks.items():
            if not (isinstance(check.get("size"), int) and check["size"] >= 0
                    and isinstance(check.get("sample_sha256"), str)):
                raise ConfigError(f"file_checks[{quote(repr(name))}] must hold an integer 'size' "
                                  f"and a 'sample_sha256' string; {REEXPORT}")

    def _check_graph(self, key: str, graph: GraphSpec) -> None:
        config, kv = self.config, self.kv_cache
        specs = {t.name: t for t in [*graph.inputs, *graph.outputs]}
        layers = sum(t.name.startswith("past_key_") for t in graph.inputs)
        for field_name, value in (("config num_hidden_layers", config.num_hidden_layers),
                                  ("kv_cache.num_layers", kv.num_layers)):
            if layers and layers != value:
                raise ConfigError(f"manifest {field_name}={value} contradicts the graph "
                                  f"({quote(graph.file)} has {layers} layers of past_key inputs); "
                                  f"{REEXPORT}")
        kv_inputs = [t for t in graph.inputs if t.name.startswith(("past_key_", "past_value_"))]
        for tensor in kv_inputs:
            if len(tensor.shape) != 4:
                raise ConfigError(f"graphs.{quote(key)} {quote(tensor.name)} has shape "
                                  f"{tensor.shape}, not [1, kv_heads, length, head_dim]; "
                                  f"{REEXPORT}")
            heads, head_dim = tensor.shape[1], tensor.shape[3]
            for field_name, value, got, what in (
                    ("config num_key_value_heads", config.num_key_value_heads, heads,
                     "KV heads"),
                    ("kv_cache.num_kv_heads", kv.num_kv_heads, heads, "KV heads"),
                    ("config head_dim", config.head_dim, head_dim, "a head size of"),
                    ("kv_cache.head_dim", kv.head_dim, head_dim, "a head size of")):
                if isinstance(got, int) and got != value:
                    has = f"{got} {what}" if what == "KV heads" else f"{what} {got}"
                    raise ConfigError(f"manifest {field_name}={value} contradicts the graph "
                                      f"({quote(tensor.name)} of {quote(graph.file)} has {has}); "
                                      f"{REEXPORT}")
            if graph.shared_cache and tensor.dtype != kv.dtype:
                raise ConfigError(f"manifest kv_cache.dtype={kv.dtype} contradicts the graph "
                                  f"({quote(tensor.name)} of {quote(graph.file)} is "
                                  f"{quote(tensor.dtype)}); {REEXPORT}")
        for name, field_name, value, axis in (
                ("logits", "vocab_size", config.vocab_size, -1),
                ("hidden", "hidden_size", config.hidden_size, -1)):
            tensor = specs.get(name)
            got = tensor.shape[axis] if tensor is not None and tensor.shape else None
            if isinstance(got, int) and got != value:
                raise ConfigError(f"manifest config {field_name}={value} contradicts the graph "
                                  f"({name} of {quote(graph.file)} has {got}); {REEXPORT}")

    @property
    def draft_kv_cache(self) -> KVCacheSpec | None:
        """The draft layer's cache (one layer), allocated at load beside the backbone's."""
        return KVCacheSpec.from_dict(self.draft["kv_cache"]) if self.draft else None

    def _check_draft(self) -> None:
        graph = self.graphs.get(GraphKey.DRAFT)
        draft = self.draft
        if graph is None:
            if draft is not None:
                raise ConfigError(f"the manifest has a 'draft' section but no draft graph; "
                                  f"{REEXPORT}")
            return
        if not isinstance(draft, dict) or not isinstance(draft.get("kv_cache"), dict):
            raise ConfigError(f"the manifest has a draft graph but no 'draft' section with a "
                              f"kv_cache; {REEXPORT}")
        for field_name in ("topk", "depth"):
            value = draft.get(field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"draft.{field_name} must be a positive integer, got "
                                  f"{_describe(value)}; {REEXPORT}")
        tree = draft.get("tree")
        if tree is not None:
            for field_name in DRAFT_TREE_FIELDS:
                value = tree.get(field_name) if isinstance(tree, dict) else None
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(f"draft.tree.{field_name} must be a positive integer, "
                                      f"got {_describe(value)}; re-run `edgert tune-tree` or "
                                      f"{REEXPORT}")
        kv = self.draft_kv_cache
        ids = {t.name: t for t in graph.outputs}.get("draft_topk_ids")
        got = ids.shape[2] if ids is not None and len(ids.shape) == 3 else None
        if got != draft["topk"]:
            raise ConfigError(f"manifest draft.topk={draft['topk']} contradicts the graph "
                              f"(draft_topk_ids has {got}); {REEXPORT}")
        if (kv.num_layers, kv.num_kv_heads, kv.head_dim) != (
                1, self.config.num_key_value_heads, self.config.head_dim):
            raise ConfigError(f"draft.kv_cache must be one layer of the model's KV heads and "
                              f"head size, got {kv}; {REEXPORT}")
        if kv.capacity < self.kv_cache.capacity:
            raise ConfigError(f"draft.kv_cache.capacity={kv.capacity} is below the model's "
                              f"{self.kv_cache.capacity}; {REEXPORT}")

    def _check_medusa(self) -> None:
        graph = self.graphs.get(GraphKey.MEDUSA)
        medusa = self.medusa
        if graph is None:
            return
        if not isinstance(medusa, dict):
            raise ConfigError(f"the manifest has a Medusa heads graph but no 'medusa' section; "
                              f"{REEXPORT}")
        outputs = {t.name: t for t in graph.outputs}
        ids = outputs.get("medusa_topk_ids")
        shape = ids.shape if ids is not None else []
        for field_name, axis in (("num_heads", 0), ("topk", 2)):
            value = medusa.get(field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"medusa.{field_name} must be a positive integer, got "
                                  f"{_describe(value)}; {REEXPORT}")
            got = shape[axis] if len(shape) == 3 else None
            if not isinstance(got, int):
                raise ConfigError(f"graphs.medusa lacks a medusa_topk_ids output of shape "
                                  f"[heads, n, topk]; {REEXPORT}")
            if got != value:
                raise ConfigError(f"manifest medusa.{field_name}={value} contradicts the graph "
                                  f"(medusa_topk_ids has {got}); {REEXPORT}")
        tree = self.tree
        if tree is None:
            return
        if not isinstance(tree.get("choices"), list):
            raise ConfigError(f"tree.choices must be a list of rank paths; {REEXPORT}")
        tuned = tree.get("tuned_for")
        if tuned is not None and not (isinstance(tuned, dict) and all(
                _mismatch(tuned.get(name), float | None, name) is None
                for name in ("predicted_tokens_per_s", "plain_tokens_per_s"))):
            raise ConfigError("tree.tuned_for must be null or an object whose "
                              "predicted_tokens_per_s and plain_tokens_per_s are numbers; "
                              "re-run `edgert tune-tree` or re-export the artifact")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
