"""Registry of the architectures edgert can load and export, keyed by the names sources use.

An entry says how a source's config becomes edgert's typed config (``config_class``, read by
both loaders) and how llama.cpp stored its weights (``gguf_permuted_qk``: its converter
reorders the q/k projection rows of Llama-family models into interleaved rotary pairs). The
exported decoder (``edgert.export.llama``) reads the typed config; it has no per-name branch.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgert.errors import ModelSourceError
from edgert.model.config import LlamaConfig


@dataclass(frozen=True)
class Architecture:
    name: str
    config_class: type[LlamaConfig]  # from_hf(config.json dict); constructed by the GGUF loader
    gguf_permuted_qk: bool = True  # llama.cpp's row order of q/k projections: undo it on load


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", LlamaConfig),
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
