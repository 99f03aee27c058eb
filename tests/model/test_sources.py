"""Model sources: HF config mapping, architecture registry, GGUF loading (tiny GGUF)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edgert.errors import ConfigError, ModelSourceError
from edgert.model.config import DecoderConfig
from edgert.model.gguf_loader import load_gguf, unpermute_qk
from edgert.model.sources import load_model


def test_rope_theta_read_from_rope_parameters():
    cfg = DecoderConfig.from_hf({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                               "num_hidden_layers": 1, "num_attention_heads": 2,
                               "rope_parameters": {"rope_theta": 100000.0,
                                                   "rope_type": "default"}})
    assert cfg.rope_theta == 100000.0 and cfg.num_key_value_heads == 2 and cfg.head_dim == 4
    assert "rope_theta" in cfg.to_dict()


def test_llama3_rope_scaling_accepted():
    cfg = DecoderConfig.from_hf({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                               "num_hidden_layers": 1, "num_attention_heads": 2,
                               "rope_theta": 500000.0,
                               "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192}})
    assert cfg.rope_type == "llama3"


def test_llama3_inverse_frequencies_match_transformers():
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgert.model.rope import inverse_frequencies

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = HFConfig(hidden_size=64, num_attention_heads=2, rope_theta=500000.0,
                  rope_scaling=scaling, max_position_embeddings=512)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = inverse_frequencies(DecoderConfig.from_hf(hf.to_dict()))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("field, value, match", [
    ("num_key_value_heads", 3, "multiple"),
    ("hidden_size", 0, "positive"),
])
def test_inconsistent_config_refused(field, value, match):
    data = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32}
    data[field] = value
    with pytest.raises(ConfigError, match=match):
        DecoderConfig.from_dict(data)


def test_unknown_config_field_refused():
    with pytest.raises(ConfigError, match="bogus"):
        DecoderConfig.from_dict({"vocab_size": 10, "bogus": 1})


def test_unsupported_architecture_lists_supported(tiny_dir, tmp_path):
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    supported = "gemma2, llama, mistral, qwen2, qwen3"
    with pytest.raises(ModelSourceError, match=f"not supported; supported: {supported}"):
        load_model(str(other))


def test_unknown_name_lists_registered():
    with pytest.raises(ModelSourceError, match="smollm2-135m"):
        load_model("gpt-17")


def test_unpermute_inverts_llama_cpp_permutation():
    n_heads, head_dim, hidden = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((n_heads * head_dim, hidden))
    permuted = w.reshape(n_heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), w)


def write_tiny_gguf(hf_dir, path):
    """A GGUF written the way llama.cpp's converter does (q/k permuted, F32)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    writer.add_token_merges(merges)
    writer.add_eos_token_id(specials["<|im_end|>"])
    writer.add_bos_token_id(specials["<|endoftext|>"])
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, gg_name in names.items():
            w = state[f"model.layers.{i}.{hf_name}.weight"].numpy()
            proj = hf_name.split(".")[-1]
            if proj in heads:
                n = heads[proj]
                half = w.shape[0] // n // 2
                w = w.reshape(n, 2, half, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
            writer.add_tensor(f"blk.{i}.{gg_name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_loads_same_weights_and_tokenizer_as_hf_dir(tiny_dir, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_dir, path)
    from_gguf = load_gguf(path)
    from_dir = load_model(str(tiny_dir))
    assert from_gguf.config.num_key_value_heads == from_dir.config.num_key_value_heads
    assert from_gguf.config.tie_word_embeddings
    for name, tensor in from_dir.state_dict.items():
        assert torch.equal(from_gguf.state_dict[name], tensor), name
    from tokenizers import Tokenizer

    a = Tokenizer.from_str(from_gguf.tokenizer.tokenizer_json)
    b = Tokenizer.from_str(from_dir.tokenizer.tokenizer_json)
    text = "<|im_start|>user\nclass Foo: pass  # 42<|im_end|>"
    assert a.encode(text).ids == b.encode(text).ids
    assert from_gguf.tokenizer.eos_token == "<|im_end|>"


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="not a readable GGUF"):
        load_model(str(bad))


# differs from the GPT-2 split with the tiny vocabulary (newline runs before indentation)
PRE_TOKENIZER_TEXT = "IT'S 1999!\n\n\n    def f():\n  x = 10 + 200, isn't it?"


def _gguf_with_tokenizer(path, hf_tokenizer, pre: str):
    import gguf

    tok = json.loads(hf_tokenizer.to_str())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"]}
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in tok["model"]["merges"]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_gguf_pre_tokenizer_splits_like_the_models_own(pre, tmp_path):
    """A GGUF's ``tokenizer.ggml.pre`` picks the split regex the model's tokenizer.json uses
    (Qwen2: digits one by one; Llama 3: up to three digits); built the way those
    tokenizer.json files are (Split, then ByteLevel without its own regex), the same BPE
    encodes text identically from both."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    from edgert.model.gguf_loader import LLAMA3_SPLIT, QWEN2_SPLIT, tokenizer_from_gguf
    from tests.tiny_model import build_tokenizer

    split = {"qwen2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT}[pre]
    hf = build_tokenizer()
    gpt2_ids = hf.encode(PRE_TOKENIZER_TEXT).ids
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    reader = _gguf_with_tokenizer(tmp_path / "tok.gguf", hf, pre)
    ours = Tokenizer.from_str(tokenizer_from_gguf(reader).tokenizer_json)
    expected = hf.encode(PRE_TOKENIZER_TEXT).ids
    assert ours.encode(PRE_TOKENIZER_TEXT).ids == expected
    assert expected != gpt2_ids  # the split matters on this text
    assert ours.decode(expected) == PRE_TOKENIZER_TEXT


def test_unknown_gguf_pre_tokenizer_refused(tmp_path):
    from edgert.model.gguf_loader import tokenizer_from_gguf
    from tests.tiny_model import build_tokenizer

    reader = _gguf_with_tokenizer(tmp_path / "tok.gguf", build_tokenizer(), "mystery-bpe")
    with pytest.raises(ModelSourceError, match="pre-tokenizer 'mystery-bpe'.*Hugging Face"):
        tokenizer_from_gguf(reader)


@pytest.mark.parametrize("fields, hidden, head_dim, expected", [
    ({"attention.scale": 0.125, "block_count": 26, "attention.head_count": 8}, 2304, 256, 0.125),
    ({"block_count": 26, "attention.head_count": 8}, 2304, 256, 256 ** -0.5),  # 2B, 9B
    ({"block_count": 46, "attention.head_count": 32}, 4608, 128, (4608 / 32) ** -0.5),  # 27B
])
def test_gemma2_gguf_query_scale_follows_llama_cpp(fields, hidden, head_dim, expected):
    """llama.cpp writes no query scale for Gemma 2: the file's attention.scale when present,
    else its own rule (the 46-layer 27B scales by hidden/heads, the others by head_dim)."""
    from edgert.model.architectures import _gemma2_query_scale

    get = lambda key, default=None: fields.get(key, default)  # noqa: E731
    assert _gemma2_query_scale(get, hidden, head_dim) == pytest.approx(expected)
