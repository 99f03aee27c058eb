"""The EAGLE-style draft layer's config and files (the module: ``edgert.export.draft_layer``).

The draft layer is one decoder layer over the backbone's features.

Drafting token t+2 from the backbone's final-norm hidden state h_t (its "feature") and the
token t+1 it chose::

    [embed(x_{t+1}); h_t] [1,q,2H] ─fc─> [1,q,H] ─decoder layer (the backbone's kind, its own
    KV cache over the draft positions)─> ─final norm─> f_{t+1} [1,q,H] ─lm_head (V' columns)─>
    the draft's logits for x_{t+2}

f_{t+1} predicts h_{t+1}, the feature the backbone will have at t+1, so the draft runs
autoregressively on its own output: (f_{t+1}, x_{t+2}) -> f_{t+2}, and so on. Unlike Medusa's
independent heads, each drafted token sees the drafts before it. The embedding and lm_head are
the backbone's own (frozen, not stored here); only ``fc``, the layer and its norm are trained.
With ``output_vocab`` V' the logits cover only ``vocab_ids`` (the tokens the backbone produces
most often), so a draft step reads V'/V of the lm_head.

``feature_layers`` (EAGLE-3's multi-layer features): the feature also carries the backbone's
residual stream after those decoder layers (low and middle layers, say), each RMS-normalised
and projected by ``aux_fc`` onto the layer's input next to ``fc``'s::

    x = fc([embed(x_{t+1}); h_t]) + aux_fc([rms(r_t^(l1)); rms(r_t^(l2)); ...])

The backbone's graphs then return ``features`` [1,q,(1+L)H]: h_t, then the L residual
states. The draft's own output f has no residual states: ``draft_hidden`` carries f with
zeros in their place, which the RMS norm keeps at zero, so rows drafted on the draft's own
features read ``fc``'s part alone (training drops the residual states of a share of the rows
to match).

Stored as ``draft.safetensors`` + ``draft.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError, ModelSourceError
from edgert.model.config import DecoderConfig, reject_unknown_fields

DRAFT_CONFIG = "draft.json"
DRAFT_WEIGHTS = "draft.safetensors"


@dataclass(frozen=True)
class DraftConfig:
    """``layer``: the backbone's config with one hidden layer (the draft layer's geometry,
    rotary and norms); ``output_vocab``: V' > 0 scores only ``vocab_ids``."""

    layer: dict[str, Any]
    output_vocab: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    # residual-stream indices (after k decoder layers, 1 <= k < layers) joining the feature
    feature_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        config = self.decoder_config
        if config.num_hidden_layers != 1:
            raise ConfigError(f"a draft layer has one decoder layer, its config says "
                              f"{config.num_hidden_layers}")
        if not 0 <= self.output_vocab < config.vocab_size:
            raise ConfigError(f"output_vocab must be 0 (all) or below vocab_size="
                              f"{config.vocab_size}, got {self.output_vocab}")
        object.__setattr__(self, "feature_layers", tuple(int(k) for k in self.feature_layers))
        if len(set(self.feature_layers)) != len(self.feature_layers) or any(
                k < 1 for k in self.feature_layers):
            raise ConfigError(f"feature_layers must be distinct layer counts >= 1, got "
                              f"{list(self.feature_layers)}")

    @classmethod
    def for_backbone(cls, backbone: DecoderConfig, output_vocab: int = 0,
                     feature_layers: tuple[int, ...] = ()) -> DraftConfig:
        if any(k >= backbone.num_hidden_layers for k in feature_layers):
            raise ConfigError(f"feature_layers {list(feature_layers)} must be below the "
                              f"backbone's {backbone.num_hidden_layers} layers")
        return cls(dataclasses.replace(backbone, num_hidden_layers=1).to_dict(), output_vocab,
                   feature_layers=tuple(feature_layers))

    @functools.cached_property
    def decoder_config(self) -> DecoderConfig:
        return DecoderConfig.from_dict(self.layer)

    @property
    def hidden_size(self) -> int:
        return self.decoder_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.decoder_config.vocab_size

    @property
    def feature_size(self) -> int:
        """Width of a feature row: h_t, then one residual state per ``feature_layers``."""
        return (1 + len(self.feature_layers)) * self.hidden_size

    @property
    def projected_vocab(self) -> int:
        return self.output_vocab or self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        out = {"layer": self.layer, "output_vocab": self.output_vocab,
               "training": self.training}
        if self.feature_layers:  # omitted when empty: older edgerts read the file
            out["feature_layers"] = list(self.feature_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DraftConfig:
        reject_unknown_fields(cls, data, f"draft layer ({DRAFT_CONFIG})")
        return cls(**data)

    def check_backbone(self, backbone: DecoderConfig, where: str = "draft layer") -> None:
        """Refuse a draft trained for another model: its geometry and vocabulary must be the
        backbone's (one layer)."""
        expected = dataclasses.replace(backbone, num_hidden_layers=1)
        if self.decoder_config != expected:
            mine, theirs = self.decoder_config.to_dict(), expected.to_dict()
            differ = [k for k in theirs if mine.get(k) != theirs[k]]
            raise ModelSourceError(
                f"{where} does not fit this model (it differs in {', '.join(differ[:4])}); "
                "train one for this model with `edgert train-draft`")
        if any(k >= backbone.num_hidden_layers for k in self.feature_layers):
            raise ModelSourceError(
                f"{where} reads the residual stream after layers {list(self.feature_layers)}, "
                f"but this model has {backbone.num_hidden_layers}; train one for this model "
                "with `edgert train-draft`")


def read_draft_config(directory: Path, backbone: DecoderConfig | None = None) -> DraftConfig:
    """The config of the draft in ``directory``; with ``backbone``, checked against it."""
    directory = Path(directory)
    if not (directory / DRAFT_CONFIG).is_file() or not (directory / DRAFT_WEIGHTS).is_file():
        raise ModelSourceError(f"{directory} is not a draft layer directory (needs "
                               f"{DRAFT_CONFIG} and {DRAFT_WEIGHTS}); train one with "
                               "`edgert train-draft`")
    try:
        config = DraftConfig.from_dict(json.loads((directory / DRAFT_CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelSourceError(f"{directory / DRAFT_CONFIG} is corrupt ({exc})") from None
    if backbone is not None:
        config.check_backbone(backbone, where=f"the draft layer in {directory}")
    return config
