"""Tiny random-weight Llama models (HF directory form) for the fast test suite."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def training_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:40]]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    return tok


def tiny_hf_config(vocab_size: int, **overrides) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "initializer_range": 0.1,  # peaked logits: greedy comparisons have no near-ties
    }
    config.update(overrides)
    return config


def build_tiny_llama_dir(directory: Path, seed: int = 0, **config_overrides) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config = tiny_hf_config(tok.get_vocab_size(), **config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE,
    }))
    return directory


def load_reference(directory: Path):
    """The transformers model for a tiny directory (the torch reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def save_random_heads(model_dir: Path, out: Path, seed: int, std: float,
                      vocab_ids: torch.Tensor | None = None, **options) -> Path:
    """Medusa heads for the tiny model in ``model_dir`` (3 heads, 1 block each; ``options``:
    more MedusaConfig fields) with every weight drawn from N(0, std): bad proposals. Saved to
    ``out``."""
    from edgert.model.medusa_heads import MedusaConfig, MedusaHeads, save_heads

    cfg = json.loads((model_dir / "config.json").read_text())
    heads = MedusaHeads(MedusaConfig(3, 1, cfg["hidden_size"], cfg["vocab_size"], **options),
                        vocab_ids=vocab_ids)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, std)
    save_heads(heads, out)
    return out
