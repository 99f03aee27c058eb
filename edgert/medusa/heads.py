"""Medusa heads: K heads on the backbone's last (final-norm) hidden state.

Head i predicts the token at t+i+2 from the hidden state at t::

    h ─┬─> ResBlock_i,1 ─> ... ─> ResBlock_i,n ─> projection ─> logits_i [V]
       │   ResBlock(x) = x + SiLU(W x + b)   (W zero-initialised: a new head starts as lm_head)
       └── (one chain of n *separate* blocks per head)

The projection is the backbone's own ``lm_head`` ("shared": a head is only its blocks, 576x577
floats per block for SmolLM2) or the head's own copy initialised from it ("own").
Stored as ``heads.safetensors`` + ``heads.json`` (docs/medusa.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgert.config import LlamaConfig, reject_unknown_fields
from edgert.errors import ConfigError, ModelSourceError

HEADS_CONFIG = "heads.json"
HEADS_WEIGHTS = "heads.safetensors"
PROJECTIONS = ("shared", "own")


@dataclass(frozen=True)
class MedusaConfig:
    num_heads: int = 4
    num_layers: int = 1
    hidden_size: int = 0
    vocab_size: int = 0
    projection: str = "shared"
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_layers < 1:
            raise ConfigError(f"num_heads and num_layers must be >= 1, got {self.num_heads}, "
                              f"{self.num_layers}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS}, got "
                              f"{self.projection!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedusaConfig:
        reject_unknown_fields(cls, data, f"Medusa heads ({HEADS_CONFIG})")
        return cls(**data)

    def check_backbone(self, backbone: LlamaConfig, where: str = "heads") -> None:
        """Refuse heads trained for another hidden size or vocabulary."""
        if self.hidden_size != backbone.hidden_size or self.vocab_size != backbone.vocab_size:
            raise ModelSourceError(
                f"{where} do not fit this model: heads have hidden_size={self.hidden_size}, "
                f"vocab_size={self.vocab_size}; the model has hidden_size={backbone.hidden_size}, "
                f"vocab_size={backbone.vocab_size}. Train heads for this model with "
                "`edgert train-heads`")


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """``forward(hidden [..., H], lm_head_t [H, V]) -> logits [K, ..., V]``."""

    def __init__(self, config: MedusaConfig, lm_head_t: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(h) for _ in range(config.num_layers)])
            for _ in range(config.num_heads))
        if config.projection == "own":
            if lm_head_t is None:
                lm_head_t = torch.zeros(h, config.vocab_size)
            self.proj_t = nn.ParameterList(nn.Parameter(lm_head_t.detach().clone())
                                           for _ in range(config.num_heads))

    def head_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """[K, ..., H]: each head's state before the vocab projection."""
        return torch.stack([blocks(hidden) for blocks in self.blocks])

    def forward(self, hidden: torch.Tensor, lm_head_t: torch.Tensor) -> torch.Tensor:
        states = self.head_states(hidden)
        if self.config.projection == "shared":
            return torch.matmul(states, lm_head_t)
        return torch.stack([torch.matmul(states[i], p) for i, p in enumerate(self.proj_t)])


def save_heads(heads: MedusaHeads, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in heads.state_dict().items()}
    save_file(state, str(directory / HEADS_WEIGHTS))
    (directory / HEADS_CONFIG).write_text(json.dumps(heads.config.to_dict(), indent=2) + "\n")


def load_heads(directory: Path, backbone: LlamaConfig | None = None) -> MedusaHeads:
    """Load heads saved by :func:`save_heads`; with ``backbone``, check they fit it."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / HEADS_CONFIG).is_file() or not (directory / HEADS_WEIGHTS).is_file():
        raise ModelSourceError(f"{directory} is not a Medusa heads directory (needs "
                               f"{HEADS_CONFIG} and {HEADS_WEIGHTS}); train heads with "
                               "`edgert train-heads`")
    try:
        config = MedusaConfig.from_dict(json.loads((directory / HEADS_CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelSourceError(f"{directory / HEADS_CONFIG} is corrupt ({exc})") from None
    if backbone is not None:
        config.check_backbone(backbone, where=f"heads in {directory}")
    heads = MedusaHeads(config)
    try:
        state = load_file(str(directory / HEADS_WEIGHTS))
        heads.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors / torch raise several types
        raise ModelSourceError(f"cannot load {directory / HEADS_WEIGHTS} ({exc}); the file is "
                               "corrupt or does not match heads.json") from None
    return heads.eval()
