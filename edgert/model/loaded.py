"""What every model source loader returns: config, fp32 weights and the tokenizer (and, from a
quantized GGUF, the weights' blocks as stored)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgert.model.block_quant import BlockQuantized
from edgert.model.config import DecoderConfig


@dataclass
class TokenizerBundle:
    """A tokenizer in `tokenizers` JSON form plus the chat template and special tokens."""

    tokenizer_json: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool = False


@dataclass
class LoadedModel:
    """A model read from any source: Llama config, HF-named fp32 state dict, tokenizer.

    ``quantized``: HF name -> the weight's blocks as the source stores them, for the GGUF
    types that map exactly (Q4_0, Q4_1, Q8_0; ``state_dict`` holds their exact fp32 values).
    ``source_types``: HF name -> the source's storage type of every weight ("F32", "Q4_K", ...).
    """

    architecture: str
    config: DecoderConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: TokenizerBundle
    source: dict[str, str] = field(default_factory=dict)
    quantized: dict[str, BlockQuantized] = field(default_factory=dict)
    source_types: dict[str, str] = field(default_factory=dict)

    def lm_head_t(self) -> torch.Tensor:
        """The output projection transposed, [H, V] (the embedding when weights are tied)."""
        weight = self.state_dict.get("lm_head.weight")
        if weight is None or self.config.tie_word_embeddings:
            weight = self.state_dict["model.embed_tokens.weight"]
        return weight.t().contiguous()

    def embedding(self) -> torch.Tensor:
        """The token embedding, [V, H]."""
        return self.state_dict["model.embed_tokens.weight"]
