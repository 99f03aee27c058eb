"""The EAGLE-style draft layer module (config and files: ``edgert.model.draft_config``).

The layer is this package's ``DecoderLayer``: training runs the very modules that are exported
(the portable attention core, sequences packed into one row with a block-diagonal causal
bias), so the exported graph and the trained module are one definition.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgert.errors import ConfigError, ModelSourceError
from edgert.export.attention import PortableCore
from edgert.export.decoder import DecoderLayer, Rotary, norm, rotary_tables
from edgert.model.config import DecoderConfig
from edgert.model.draft_config import DRAFT_CONFIG, DRAFT_WEIGHTS, DraftConfig, read_draft_config
from edgert.model.module_files import save_module_files
from edgert.model.rope import inverse_frequencies

RMS_EPS = 1e-6


def rms_normalized(x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) over the last axis, no weight (zero rows stay zero)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


class DraftLayer(nn.Module):
    """``forward(features [1,q,H], token_embeddings [1,q,H], rotary, past_k, past_v, ctx)
    -> (f [1,q,H], present_k, present_v)``; :meth:`logits` projects f onto the V' columns.

    ``make_core``: the attention core (``edgert.export.attention``): the portable one for
    training and the torch reference, GroupQueryAttention for ONNX Runtime's graph."""

    def __init__(self, config: DraftConfig, make_core=None,
                 vocab_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        layer_config = config.decoder_config
        h = layer_config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        if config.feature_layers:  # EAGLE-3-style residual states (draft_config's docstring)
            self.aux_fc = nn.Linear(len(config.feature_layers) * h, h, bias=False)
        self.layer = DecoderLayer(layer_config, make_core or PortableCore)
        self.norm = norm(layer_config)
        inv_freq = torch.tensor(inverse_frequencies(layer_config), dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if config.output_vocab:
            if vocab_ids is None:
                vocab_ids = torch.arange(config.output_vocab)
            if vocab_ids.shape != (config.output_vocab,):
                raise ConfigError(f"vocab_ids has shape {tuple(vocab_ids.shape)}, expected "
                                  f"({config.output_vocab},)")
            self.register_buffer("vocab_ids", vocab_ids.to(torch.int64).clone())

    def rotary(self, position_ids: torch.Tensor, fused: bool = False) -> Rotary:
        """Rotary tables of the draft rows' positions [1,q] (a row embedding token t+1 sits at
        position t+1)."""
        return rotary_tables(self.inv_freq, position_ids, fused)

    def forward(self, features, token_embeddings, rotary, past_k, past_v, ctx):
        """``features`` [1,q,feature_size]: h_t, then the residual states (zeros on rows that
        have none)."""
        h = self.config.hidden_size
        x = self.fc(torch.cat([token_embeddings, features[..., :h]], dim=-1))
        if self.config.feature_layers:
            x = x + self.aux_fc(torch.cat(
                [rms_normalized(features[..., h * i:h * (i + 1)])
                 for i in range(1, len(self.config.feature_layers) + 1)], dim=-1))
        x, present_k, present_v = self.layer(x, rotary, past_k, past_v, ctx)
        return self.norm(x), present_k, present_v

    def as_feature(self, f: torch.Tensor) -> torch.Tensor:
        """The draft's own output f [..., H] as a feature row: zeros where the residual
        states go (the rows it drafts on its own read ``fc``'s part alone)."""
        layers = len(self.config.feature_layers)
        return torch.cat([f, *[torch.zeros_like(f)] * layers], dim=-1) if layers else f

    def select_vocab(self, lm_head_t: torch.Tensor) -> torch.Tensor:
        """The columns of ``lm_head_t`` [H, V] the draft scores: [H, V']."""
        if not self.config.output_vocab:
            return lm_head_t
        return lm_head_t.index_select(1, self.vocab_ids)

    def logits(self, features: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        """[..., V'] over ``projection`` = ``select_vocab(lm_head_t)``."""
        return torch.matmul(features, projection)

    def to_vocab(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of positions in the draft's logits."""
        return self.vocab_ids[index] if self.config.output_vocab else index


def save_draft(draft: DraftLayer, directory: Path) -> None:
    save_module_files(draft, draft.config.to_dict(), directory, DRAFT_WEIGHTS, DRAFT_CONFIG)


def load_draft(directory: Path, backbone: DecoderConfig | None = None) -> DraftLayer:
    """Load a draft saved by :func:`save_draft`; with ``backbone``, check that it fits."""
    from safetensors.torch import load_file

    directory = Path(directory)
    draft = DraftLayer(read_draft_config(directory, backbone))
    try:
        draft.load_state_dict(load_file(str(directory / DRAFT_WEIGHTS)), strict=True)
    except Exception as exc:  # safetensors / torch raise several types
        raise ModelSourceError(f"cannot load {directory / DRAFT_WEIGHTS} ({exc}); the file is "
                               "corrupt or does not match draft.json") from None
    return draft.eval()
