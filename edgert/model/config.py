"""Typed model configuration, as stored in the artifact manifest.

One config describes every supported decoder family (Llama, Mistral, Qwen2/2.5, Qwen3,
Gemma 2): the Llama fields plus structural switches whose defaults are plain Llama. The
architecture registry (``edgert.model.architectures``) sets the switches per family; the
exported decoder reads only the switches, never a family name.

``DecoderConfig.from_dict`` is strict (it reads edgert's own manifest and rejects unknown or
inconsistent fields); ``DecoderConfig.from_hf`` reads the fields every family shares from a
Hugging Face ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from edgert.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "frequency_factors")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_tanh")


def reject_unknown_fields(cls, data: dict[str, Any], what: str) -> None:
    """Raise ConfigError naming fields of ``data`` that dataclass ``cls`` does not define."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; known fields: {sorted(known)} "
                          "(written by a newer edgert?)")


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a decoder; the fields after ``eos_token_id`` are the structural
    switches of the non-Llama families (defaults: Llama)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)
    attention_bias: bool = False  # q/k/v projections have a bias (Qwen2)
    attention_output_bias: bool = False  # o_proj has a bias (Llama's attention_bias=True)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3)
    hidden_act: str = "silu"  # the gate activation: silu, or gelu_tanh (Gemma)
    norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + weight): 1.0 in Gemma
    sandwich_norms: bool = False  # Gemma 2: a norm after attention, and around the MLP
    embedding_multiplier: float = 1.0  # token embeddings times this (Gemma: sqrt(hidden))
    query_scale: float = 0.0  # attention scores' scale; 0: 1/sqrt(head_dim)
    attn_logit_softcapping: float = 0.0  # scores -> c*tanh(scores/c); 0: none (Gemma 2)
    final_logit_softcapping: float = 0.0  # logits -> c*tanh(logits/c); 0: none (Gemma 2)
    # the attention window of sliding-window layers (Mistral, Gemma 2); 0: every layer
    # attends to the whole context. edgert caps the context at the window (max_context), so
    # every layer attends exactly as the model does.
    sliding_window: int = 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._validate()

    def _validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "head_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}); fix the model config")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type '{rope_type}' is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope_type == "frequency_factors" and len(self.rope_scaling.get("factors", ())) != \
                self.head_dim // 2:
            raise ConfigError(f"rope_scaling 'frequency_factors' needs head_dim/2 = "
                              f"{self.head_dim // 2} factors")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act '{self.hidden_act}' is not supported; supported: "
                              f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        non_negative = ("query_scale", "attn_logit_softcapping", "final_logit_softcapping",
                        "sliding_window")
        for name in non_negative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"config field '{name}' must be a number >= 0, got {value!r}")
        if not (self.embedding_multiplier > 0 and math.isfinite(self.embedding_multiplier)):
            raise ConfigError("config field 'embedding_multiplier' must be a positive number, "
                              f"got {self.embedding_multiplier!r}")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def max_context(self) -> int:
        """The longest context edgert serves: the model's maximum, capped at the sliding
        window when some layers slide (within it, windowed and full attention agree)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_id"] = list(self.eos_token_id)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """Build from edgert's own manifest form; unknown fields are an error."""
        reject_unknown_fields(cls, data, "model config")
        missing_marker = dataclasses.MISSING
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is missing_marker and f.default_factory is missing_marker]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"model config is missing required field(s) {missing}")
        return cls(**data)

    @classmethod
    def from_hf(cls, data: dict[str, Any], **switches: Any) -> DecoderConfig:
        """Read a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout): the
        fields every family shares; ``switches``, the family's structural fields."""
        rope_params = data.get("rope_parameters") or {}
        rope_scaling = data.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        # transformers 5 keeps rope_theta inside rope_parameters; older readers default it
        # silently to 10000, so it is always written explicitly in edgert's own config.
        rope_theta = data.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        eos = data.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        n_heads = data.get("num_attention_heads")
        try:
            return cls(
                vocab_size=data["vocab_size"],
                hidden_size=data["hidden_size"],
                intermediate_size=data["intermediate_size"],
                num_hidden_layers=data["num_hidden_layers"],
                num_attention_heads=n_heads,
                num_key_value_heads=data.get("num_key_value_heads") or n_heads,
                max_position_embeddings=data.get("max_position_embeddings", 2048),
                rope_theta=float(rope_theta),
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
                head_dim=data.get("head_dim") or 0,
                tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                bos_token_id=data.get("bos_token_id"),
                eos_token_id=eos_ids,
                **switches,
            )
        except KeyError as exc:
            raise ConfigError(f"config.json is missing '{exc.args[0]}', which a "
                              "decoder model needs") from None
