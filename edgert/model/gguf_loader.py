"""GGUF file -> fp32 weights (and the exact blocks of its Q4_0/Q4_1/Q8_0 tensors), decoder
config and tokenizer (no transformers needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgert.errors import ModelSourceError
from edgert.model.architectures import Architecture, get_architecture
from edgert.model.block_quant import GGUF_EXACT, BlockQuantized, from_gguf
from edgert.model.config import DecoderConfig
from edgert.model.loaded import LoadedModel, TokenizerBundle

# llama.cpp tensor names -> transformers Llama names ("{i}" = layer index); a family's
# extra or different names come from its registry entry (Architecture.gguf_layer_names)
_LAYER_NAMES = {
    "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_CONTROL_TOKEN = 3  # gguf TokenType.CONTROL


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time row permutation of q/k projections.

    llama.cpp reorders each head's rows from the rotate-half layout to interleaved pairs:
    ``w.reshape(n, 2, d/2, in).swapaxes(1, 2)``; this is the inverse.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_scaling(reader, p: str) -> dict | None:
    """linear scaling from the metadata; Llama 3.1's frequency-dependent scaling, which
    llama.cpp stores as a ``rope_freqs`` tensor of per-pair divisors."""
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        return {"rope_type": "frequency_factors",
                "factors": [float(x) for x in np.asarray(freqs.data, dtype=np.float64)]}
    if _field(reader, p + "rope.scaling.type") == "linear":
        return {"rope_type": "linear", "factor": float(_field(reader, p + "rope.scaling.factor"))}
    return None


def _config_from_gguf(reader) -> tuple[Architecture, DecoderConfig]:
    name = str(_field(reader, "general.architecture", "unknown"))
    arch = get_architecture(name)
    p = f"{name}."
    n_heads = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    head_dim = int(_field(reader, p + "attention.key_length",
                          _field(reader, p + "rope.dimension_count", hidden // n_heads)))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = int(_field(reader, p + "vocab_size", len(tokens.data)))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    switches = arch.gguf_switches(lambda key, default=None: _field(reader, p + key, default),
                                  hidden, head_dim)
    config = DecoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_hidden_layers=int(_field(reader, p + "block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_field(reader, p + "attention.head_count_kv", n_heads)),
        max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        head_dim=head_dim,
        tie_word_embeddings=not has_output,
        rope_scaling=_rope_scaling(reader, p),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=(int(eos),) if eos is not None else (),
        **switches,
    )
    return arch, config


def _hf_name(gguf_name: str, arch: Architecture) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        layer_names = {**_LAYER_NAMES, **arch.gguf_layer_names}
        if rest in layer_names:
            return layer_names[rest].format(i=idx)
    return None


def _qk_heads(hf_name: str, config: DecoderConfig, arch: Architecture) -> int | None:
    """Heads of a q/k projection that llama.cpp stored with permuted rows, else None."""
    if not arch.gguf_permuted_qk:
        return None
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.num_key_value_heads
    return None


def _weights_from_gguf(reader, config: DecoderConfig, arch: Architecture) -> tuple[
        dict[str, torch.Tensor], dict[str, BlockQuantized], dict[str, str]]:
    """(fp32 state dict, exact blocks of the Q4_0/Q4_1/Q8_0 tensors, storage type by name),
    all in transformers' names and row order."""
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, BlockQuantized] = {}
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name, arch)
        if hf_name is None:
            continue
        shape = [int(d) for d in reversed(tensor.shape)]
        type_name = tensor.tensor_type.name
        weight = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = weight.reshape(shape)
        heads = _qk_heads(hf_name, config, arch)
        if heads is not None:
            weight = unpermute_qk(weight, heads)
        if type_name in GGUF_EXACT and len(shape) == 2:
            quantized = from_gguf(tensor.data, type_name, *shape)
            if heads is not None:
                rows = unpermute_qk(np.arange(shape[0]), heads)
                quantized = quantized.take_rows(rows)
            blocks[hf_name] = quantized
        types[hf_name] = type_name
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(weight))
    return state, blocks, types


# llama.cpp's ``tokenizer.ggml.pre`` names -> the split regex of that byte-level BPE (the
# same pattern the model's own tokenizer.json applies before its byte-level mapping);
# GPT2_SPLIT: ByteLevel's built-in GPT-2 pattern
GPT2_SPLIT = None
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[str | None, bool]] = {
    # name: (split regex, digits split one by one first)
    "default": (GPT2_SPLIT, False),
    "gpt-2": (GPT2_SPLIT, False),
    "smollm": (GPT2_SPLIT, True),
    "starcoder": (GPT2_SPLIT, True),
    "llama-bpe": (LLAMA3_SPLIT, False),
    "llama3": (LLAMA3_SPLIT, False),
    "qwen2": (QWEN2_SPLIT, False),
}


def _pre_tokenizer(name: str | None):
    from tokenizers import Regex, pre_tokenizers

    key = name or "default"
    if key not in PRE_TOKENIZERS:
        raise ModelSourceError(
            f"GGUF pre-tokenizer '{key}' is not supported (known: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}); export from the model's Hugging Face "
            "directory, whose tokenizer.json says how it splits text")
    split, digits = PRE_TOKENIZERS[key]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return pre_tokenizers.Sequence(steps)


def tokenizer_from_gguf(reader) -> TokenizerBundle:
    """Build a `tokenizers` byte-level BPE from the GGUF vocabulary, merges and pre-tokenizer
    name."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ModelSourceError(
            f"GGUF tokenizer type '{model_kind}' is not supported (only byte-level BPE, 'gpt2'); "
            "export from a Hugging Face directory that has tokenizer.json instead")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    specials = [AddedToken(tok, special=True, normalized=False)
                for tok, kind in zip(tokens, types) if kind == _CONTROL_TOKEN]
    tokenizer.add_special_tokens(specials)

    def token(key: str) -> str | None:
        idx = _field(reader, key)
        return tokens[int(idx)] if idx is not None else None

    return TokenizerBundle(
        tokenizer_json=tokenizer.to_str(),
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def load_gguf(path: Path) -> LoadedModel:
    """Read a GGUF file: every weight dequantized to fp32, and the blocks of the exactly
    mappable quantized ones kept as stored."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises bare ValueError/struct errors on bad files
        raise ModelSourceError(
            f"{path} is not a readable GGUF file ({exc}); check the path") from None
    arch, config = _config_from_gguf(reader)
    state, blocks, types = _weights_from_gguf(reader, config, arch)
    return LoadedModel(
        architecture=arch.name,
        config=config,
        state_dict=state,
        tokenizer=tokenizer_from_gguf(reader),
        source={"kind": "gguf", "path": str(path), "name": str(_field(reader, "general.name", ""))},
        quantized=blocks,
        source_types=types,
    )


def describe(path: Path) -> str:
    """A one-line JSON summary of a GGUF's config (for diagnostics)."""
    import gguf

    _, config = _config_from_gguf(gguf.GGUFReader(str(path)))
    return json.dumps(config.to_dict())
