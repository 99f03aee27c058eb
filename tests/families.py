"""Tiny random-weight models of every supported family, built with transformers' own classes
and saved as HF directories, and GGUF files written from them the way llama.cpp's converter
writes (names from the `gguf` package's own tensor map, q/k rows permuted for Llama-family
architectures, Gemma norms stored plus one, Llama 3 scaling as a rope_freqs tensor)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tests.tiny_model import CHATML_TEMPLATE, build_tokenizer

BASE = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 2, "initializer_range": 0.1,
}


@dataclass(frozen=True)
class Family:
    hf_class: str  # transformers class
    config_class: str
    config: dict
    gguf_arch: str  # llama.cpp's general.architecture
    permuted_qk: bool = False
    norm_plus_one: bool = False  # llama.cpp stores Gemma's norm weights plus one
    extra: dict = field(default_factory=dict)  # keys only the GGUF writer reads


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

FAMILIES: dict[str, Family] = {
    # Llama 3.1 rotary scaling; original context short enough that the tiny head_dim's
    # wavelengths fall in all three bands
    "llama3": Family("LlamaForCausalLM", "LlamaConfig",
                     {"rope_theta": 10000.0, "rope_scaling": LLAMA3_SCALING,
                      "tie_word_embeddings": False}, "llama", permuted_qk=True),
    # head_dim 32 != hidden/heads; the sliding window caps the context
    "mistral": Family("MistralForCausalLM", "MistralConfig",
                      {"head_dim": 32, "sliding_window": 512, "rope_theta": 1e6,
                       "tie_word_embeddings": False}, "llama", permuted_qk=True),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config",
                    {"rope_theta": 1e6, "tie_word_embeddings": True}, "qwen2"),
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3Config",
                    {"head_dim": 32, "rope_theta": 1e6, "tie_word_embeddings": False}, "qwen3"),
    # query_pre_attn_scalar != head_dim; caps small enough to bite at this init scale;
    # alternating sliding layers
    "gemma2": Family("Gemma2ForCausalLM", "Gemma2Config",
                     {"head_dim": 32, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0,
                      "final_logit_softcapping": 3.0, "sliding_window": 512,
                      "layer_types": ["sliding_attention", "full_attention"],
                      "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"},
                     "gemma2", norm_plus_one=True),
}


def family_config(name: str, vocab_size: int) -> dict:
    family = FAMILIES[name]
    model_type = {"LlamaConfig": "llama", "MistralConfig": "mistral", "Qwen2Config": "qwen2",
                  "Qwen3Config": "qwen3", "Gemma2Config": "gemma2"}[family.config_class]
    return {"architectures": [family.hf_class], "model_type": model_type,
            "vocab_size": vocab_size, **BASE, **family.config}


def build_family_dir(name: str, directory: Path, seed: int = 0) -> Path:
    """A transformers model of family ``name`` with random weights, saved with
    save_pretrained (transformers' own config.json), plus the tiny tokenizer. Biases and
    norm weights, which transformers initializes to constants, are drawn at random too."""
    import transformers

    family = FAMILIES[name]
    tok = build_tokenizer()
    config = getattr(transformers, family.config_class)(**family_config(name, tok.get_vocab_size()))
    torch.manual_seed(seed)
    model = getattr(transformers, family.hf_class)(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() == 1:
                param.normal_(0.0, 0.2) if param_name.endswith("bias") else \
                    param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(str(directory))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE,
    }))
    return directory


def _llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """The per-pair divisors llama.cpp's converter writes as rope_freqs for Llama 3.1."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling["factor"])
        else:
            smooth = ((scaling["original_max_position_embeddings"] / wavelen
                       - scaling["low_freq_factor"])
                      / (scaling["high_freq_factor"] - scaling["low_freq_factor"]))
            factors.append(1.0 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def _write_tokenizer(writer, hf_dir: Path) -> None:
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    writer.add_tokenizer_model("gpt2")
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in tok["model"]["merges"]])
    writer.add_eos_token_id(specials["<|im_end|>"])
    writer.add_bos_token_id(specials["<|endoftext|>"])
    writer.add_chat_template(json.loads(
        (hf_dir / "tokenizer_config.json").read_text())["chat_template"])


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_family_gguf(name: str, hf_dir: Path, path: Path) -> Path:
    import gguf
    from safetensors.torch import load_file

    family = FAMILIES[name]
    cfg = json.loads((hf_dir / "config.json").read_text())
    state = {k: v.float().numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    layers = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    writer = gguf.GGUFWriter(str(path), family.gguf_arch)
    writer.add_block_count(layers)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if name == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        writer.add_sliding_window(cfg["sliding_window"])
        # llama.cpp's converter writes no scale; its own rule (1/sqrt(head_dim)) would not
        # match this tiny model's query_pre_attn_scalar, so the file states it
        writer.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)
    _write_tokenizer(writer, hf_dir)
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
    if scaling and scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(head_dim, theta, scaling))
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.gguf_arch.upper()), layers)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for hf_name, weight in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name is not None, f"no GGUF name for {hf_name}"
        projection = base.rsplit(".", 1)[-1]
        if family.permuted_qk and projection in heads:
            weight = _permute(weight, heads[projection])
        if family.norm_plus_one and base.endswith("norm"):
            weight = weight + 1.0
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
