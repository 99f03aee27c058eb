"""Medusa heads: K heads on the backbone's last (final-norm) hidden state.

Head i predicts the token at t+i+2 from the hidden state at t::

    h ─┬─> ResBlock_i,1 ─> ... ─> ResBlock_i,n ─> projection ─> logits_i [V]
       │   ResBlock(x) = x + SiLU(W x + b)   (W zero-initialised: a new head starts as lm_head)
       └── (one chain of n *separate* blocks per head)

The projection is the backbone's own ``lm_head`` ("shared": a head is only its blocks, 576x577
floats per block for SmolLM2) or the head's own copy initialised from it ("own").

Two options make heads cheaper to run and more accurate on a small model (docs/medusa.md):

- ``condition="token"``: each head first mixes in the embedding e of the tree's root, the token
  the backbone itself chose after t (known before the heads run), in one more block
  ``x = h + SiLU(W_h h + W_e e + b)``, zero-initialised like the others.
- ``output_vocab=V'``: heads score only the V' tokens the backbone produces most often
  (``vocab_ids``, chosen from the training data): the projection reads V'/V of ``lm_head``.
  Candidates outside that set are never proposed; losslessness does not depend on it.

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

from edgert.errors import ConfigError, ModelSourceError
from edgert.model.config import DecoderConfig, reject_unknown_fields
from edgert.model.module_files import save_module_files

HEADS_CONFIG = "heads.json"
HEADS_WEIGHTS = "heads.safetensors"
PROJECTIONS = ("shared", "own")
CONDITIONS = ("none", "token")


@dataclass(frozen=True)
class MedusaConfig:
    num_heads: int = 4
    num_layers: int = 1
    hidden_size: int = 0
    vocab_size: int = 0
    projection: str = "shared"
    condition: str = "none"  # "token": heads also read the tree root's embedding
    output_vocab: int = 0  # V' > 0: heads score only vocab_ids (V' frequent tokens)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_layers < 1:
            raise ConfigError(f"num_heads and num_layers must be >= 1, got {self.num_heads}, "
                              f"{self.num_layers}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS}, got "
                              f"{self.projection!r}")
        if self.condition not in CONDITIONS:
            raise ConfigError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.output_vocab < 0 or (self.vocab_size and self.output_vocab >= self.vocab_size):
            raise ConfigError(f"output_vocab must be 0 (all) or below vocab_size="
                              f"{self.vocab_size}, got {self.output_vocab}")

    @property
    def projected_vocab(self) -> int:
        """Width of the heads' logits: V' with an output vocab, else V."""
        return self.output_vocab or self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedusaConfig:
        reject_unknown_fields(cls, data, f"Medusa heads ({HEADS_CONFIG})")
        return cls(**data)

    def check_backbone(self, backbone: DecoderConfig, where: str = "heads") -> None:
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


class TokenBlock(nn.Module):
    """``h + SiLU(W_h h + W_e e + b)``: a residual block that also reads a token embedding."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(torch.cat([x, token_embedding], dim=-1)))


class MedusaHeads(nn.Module):
    """``forward(hidden [..., H], select_vocab(lm_head_t) [H, V'], root_embedding [..., H] |
    None) -> logits [K, ..., V']`` (V' = ``config.projected_vocab``)."""

    def __init__(self, config: MedusaConfig, lm_head_t: torch.Tensor | None = None,
                 vocab_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        if config.output_vocab:
            if vocab_ids is None:
                vocab_ids = torch.arange(config.output_vocab)
            if vocab_ids.shape != (config.output_vocab,):
                raise ConfigError(f"vocab_ids has shape {tuple(vocab_ids.shape)}, expected "
                                  f"({config.output_vocab},)")
            self.register_buffer("vocab_ids", vocab_ids.to(torch.int64).clone())
        if config.condition == "token":
            self.token_blocks = nn.ModuleList(TokenBlock(h) for _ in range(config.num_heads))
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(h) for _ in range(config.num_layers)])
            for _ in range(config.num_heads))
        if config.projection == "own":
            if lm_head_t is None:
                lm_head_t = torch.zeros(h, config.vocab_size)
            own = self.select_vocab(lm_head_t.detach())
            self.proj_t = nn.ParameterList(nn.Parameter(own.clone())
                                           for _ in range(config.num_heads))

    def select_vocab(self, lm_head_t: torch.Tensor) -> torch.Tensor:
        """The columns of ``lm_head_t`` [H, V] that the heads score: [H, V']."""
        if not self.config.output_vocab:
            return lm_head_t
        return lm_head_t.index_select(1, self.vocab_ids)

    def head_states(self, hidden: torch.Tensor,
                    root_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """[K, ..., H]: each head's state before the vocab projection."""
        if self.config.condition == "token":
            if root_embedding is None:
                raise ConfigError("these heads read the tree root's embedding "
                                  "(condition='token'); pass root_embedding")
            return torch.stack([blocks(mix(hidden, root_embedding))
                                for mix, blocks in zip(self.token_blocks, self.blocks)])
        return torch.stack([blocks(hidden) for blocks in self.blocks])

    def forward(self, hidden: torch.Tensor, projection: torch.Tensor | None,
                root_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the projected vocab. ``projection``: the shared projection [H, V'],
        ``select_vocab(lm_head_t)`` (unused with own projections)."""
        states = self.head_states(hidden, root_embedding)
        if self.config.projection == "shared":
            return torch.matmul(states, projection)
        return torch.stack([torch.matmul(states[i], p) for i, p in enumerate(self.proj_t)])

    def to_vocab(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of positions in the heads' logits."""
        return self.vocab_ids[index] if self.config.output_vocab else index


def save_heads(heads: MedusaHeads, directory: Path) -> None:
    save_module_files(heads, heads.config.to_dict(), directory, HEADS_WEIGHTS, HEADS_CONFIG)


def load_heads(directory: Path, backbone: DecoderConfig | None = None) -> MedusaHeads:
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
