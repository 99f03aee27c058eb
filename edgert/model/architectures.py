"""Registry of the architectures edgert can export, keyed by the names sources use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from edgert.errors import ModelSourceError
from edgert.export.llama import LlamaDecoder
from edgert.model.config import LlamaConfig


@dataclass(frozen=True)
class Architecture:
    name: str
    config_class: type
    build_decoder: Callable[[LlamaConfig], nn.Module]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", LlamaConfig, LlamaDecoder),
}

# Names found in HF config.json (model_type / architectures) and GGUF general.architecture.
ALIASES: dict[str, str] = {
    "llama": "llama",
    "LlamaForCausalLM": "llama",
}


def get_architecture(name: str) -> Architecture:
    """Look up an architecture by any of its aliases; refuse unknown ones with the list."""
    key = ALIASES.get(name)
    if key is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelSourceError(
            f"architecture '{name}' is not supported; supported: {supported} "
            "(Llama family: Llama 2/3, SmolLM2, TinyLlama)")
    return ARCHITECTURES[key]
