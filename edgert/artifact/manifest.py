"""The artifact manifest (``edgert.json``): the contract between export, compile and runtime.

See docs/artifact.md for every field. ``Manifest.from_dict`` rejects unknown fields, a wrong
format or version, and inconsistent values, each with a message naming the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(**_strict(cls, data, "graph tensor"))


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph in the artifact."""

    file: str
    attention: str  # attention variant, see edgert.export.attention.ATTENTION_VARIANTS
    shared_cache: bool
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        data = _strict(cls, data, "graph")
        data["inputs"] = [TensorSpec.from_dict(t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec.from_dict(t) for t in data["outputs"]]
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
        return cls(**_strict(cls, data, "tokenizer"))


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
        itemsize = {"float32": 4, "float16": 2}[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.capacity * self.head_dim * itemsize

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVCacheSpec:
        spec = cls(**_strict(cls, data, "kv_cache"))
        if spec.capacity <= 0:
            raise ConfigError(f"kv_cache.capacity must be positive, got {spec.capacity}")
        return spec


def _strict(cls, data: dict[str, Any], what: str) -> dict[str, Any]:
    reject_unknown_fields(cls, data, f"{MANIFEST_NAME} {what}")
    return dict(data)


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
        data = _strict(cls, data, "manifest")
        try:
            data["config"] = DecoderConfig.from_dict(data["config"])
            data["kv_cache"] = KVCacheSpec.from_dict(data["kv_cache"])
            data["graphs"] = {k: GraphSpec.from_dict(v) for k, v in data["graphs"].items()}
            data["tokenizer"] = TokenizerSpec.from_dict(data["tokenizer"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{MANIFEST_NAME} is incomplete or malformed ({exc}); "
                                "re-export the model") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
