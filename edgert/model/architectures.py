"""Registry of the decoder families edgert can load and export, keyed by the names sources use.

An entry says how a family's Hugging Face ``config.json`` becomes edgert's typed config
(``hf_switches``: the structural fields, over the fields every family shares), how its GGUF
metadata does (``gguf_switches``), which extra tensors llama.cpp stores per layer
(``gguf_layer_names``) and whether llama.cpp's converter permuted the q/k rows
(``gguf_permuted_qk``: Llama-family models are stored with interleaved rotary pairs; the
NeoX-rotary families are not). The exported decoder (``edgert.export.decoder``) reads the
typed config's switches; it has no per-family branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgert.errors import ModelSourceError
from edgert.model.config import DecoderConfig

Switches = dict[str, Any]
GGUFField = Callable[..., Any]  # (key suffix after "<arch>.", default) -> value


def _window(value: Any) -> int:
    return int(value) if value else 0


def _llama_hf(data: dict) -> Switches:
    bias = bool(data.get("attention_bias", False))
    return {"attention_bias": bias, "attention_output_bias": bias,
            "mlp_bias": bool(data.get("mlp_bias", False))}


def _mistral_hf(data: dict) -> Switches:
    return {"sliding_window": _window(data.get("sliding_window", 4096))}


def _qwen_window(data: dict) -> int:
    """Qwen2/3 slide only when use_sliding_window is set, in the layers from
    max_window_layers on; edgert caps the context at the window either way."""
    if not data.get("use_sliding_window", False):
        return 0
    layers = data.get("layer_types") or []
    if layers and "sliding_attention" not in layers:
        return 0
    return _window(data.get("sliding_window", 4096))


def _qwen2_hf(data: dict) -> Switches:
    return {"attention_bias": True, "sliding_window": _qwen_window(data)}


def _qwen3_hf(data: dict) -> Switches:
    bias = bool(data.get("attention_bias", False))
    return {"attention_bias": bias, "attention_output_bias": bias, "qk_norm": True,
            "sliding_window": _qwen_window(data)}


def _gemma_activation(name: str) -> str:
    if name not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelSourceError(f"Gemma 2 activation '{name}' is not supported "
                               "(gelu_pytorch_tanh is)")
    return "gelu_tanh"


def _gemma2_hf(data: dict) -> Switches:
    layers = data.get("layer_types") or ["sliding_attention"]
    sliding = "sliding_attention" in layers
    return {
        "hidden_act": _gemma_activation(data.get("hidden_activation")
                                        or data.get("hidden_act") or "gelu_pytorch_tanh"),
        "norm_weight_offset": 1.0,
        "sandwich_norms": True,
        "embedding_multiplier": math.sqrt(data["hidden_size"]),
        "query_scale": float(data.get("query_pre_attn_scalar", 256)) ** -0.5,
        "attn_logit_softcapping": float(data.get("attn_logit_softcapping") or 0.0),
        "final_logit_softcapping": float(data.get("final_logit_softcapping") or 0.0),
        "sliding_window": _window(data.get("sliding_window", 4096)) if sliding else 0,
        "head_dim": int(data.get("head_dim", 256)),
        "tie_word_embeddings": bool(data.get("tie_word_embeddings", True)),
    }


def _no_gguf_switches(get: GGUFField, hidden: int, head_dim: int) -> Switches:
    return {}


def _qwen2_gguf(get: GGUFField, hidden: int, head_dim: int) -> Switches:
    return {"attention_bias": True}


def _qwen3_gguf(get: GGUFField, hidden: int, head_dim: int) -> Switches:
    return {"qk_norm": True}


def _gemma2_query_scale(get: GGUFField, hidden: int, head_dim: int) -> float:
    """``attention.scale`` when the file has it; else llama.cpp's rule: 1/sqrt(hidden/heads)
    for the 46-layer 27B model, 1/sqrt(head_dim) otherwise (its converter writes no scale)."""
    scale = get("attention.scale")
    if scale:
        return float(scale)
    if int(get("block_count")) == 46:
        return (hidden / int(get("attention.head_count"))) ** -0.5
    return head_dim ** -0.5


def _gemma2_gguf(get: GGUFField, hidden: int, head_dim: int) -> Switches:
    # llama.cpp's converter adds 1 to every Gemma norm weight: norm_weight_offset stays 0
    return {
        "hidden_act": "gelu_tanh",
        "sandwich_norms": True,
        "embedding_multiplier": math.sqrt(hidden),
        "query_scale": _gemma2_query_scale(get, hidden, head_dim),
        "attn_logit_softcapping": float(get("attn_logit_softcapping", 0.0) or 0.0),
        "final_logit_softcapping": float(get("final_logit_softcapping", 0.0) or 0.0),
        "sliding_window": _window(get("attention.sliding_window", 0)),
    }


_QK_NORM_TENSORS = {
    "attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
_BIAS_TENSORS = {
    "attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
}
_SANDWICH_TENSORS = {
    # Gemma 2: ffn_norm is the pre-feed-forward norm, post_attention_norm follows attention
    "post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_switches: Callable[[dict], Switches] = lambda data: {}
    gguf_switches: Callable[[GGUFField, int, int], Switches] = _no_gguf_switches
    gguf_layer_names: dict[str, str] = field(default_factory=dict)  # over the Llama names
    gguf_permuted_qk: bool = True  # llama.cpp's row order of q/k projections: undo it on load

    def config_from_hf(self, data: dict) -> DecoderConfig:
        switches = self.hf_switches(data)
        shared = {key: switches.pop(key) for key in ("head_dim", "tie_word_embeddings")
                  if key in switches}
        return DecoderConfig.from_hf({**data, **shared}, **switches)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", _llama_hf),
    "mistral": Architecture("mistral", _mistral_hf),
    "qwen2": Architecture("qwen2", _qwen2_hf, _qwen2_gguf, _BIAS_TENSORS,
                          gguf_permuted_qk=False),
    "qwen3": Architecture("qwen3", _qwen3_hf, _qwen3_gguf, _QK_NORM_TENSORS,
                          gguf_permuted_qk=False),
    "gemma2": Architecture("gemma2", _gemma2_hf, _gemma2_gguf, _SANDWICH_TENSORS,
                           gguf_permuted_qk=False),
}

# Names found in HF config.json (model_type / architectures) and GGUF general.architecture.
ALIASES: dict[str, str] = {
    "llama": "llama", "LlamaForCausalLM": "llama",
    "mistral": "mistral", "MistralForCausalLM": "mistral",
    "qwen2": "qwen2", "Qwen2ForCausalLM": "qwen2",
    "qwen3": "qwen3", "Qwen3ForCausalLM": "qwen3",
    "gemma2": "gemma2", "Gemma2ForCausalLM": "gemma2",
}


def get_architecture(name: str) -> Architecture:
    """Look up an architecture by any of its aliases; refuse unknown ones with the list."""
    key = ALIASES.get(name)
    if key is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelSourceError(
            f"architecture '{name}' is not supported; supported: {supported} "
            "(Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2/2.5, Qwen3, Gemma 2)")
    return ARCHITECTURES[key]
