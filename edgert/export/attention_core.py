"""What every attention core of the exported decoder shares: the layer's head geometry.

A core (``edgert.export.attention.ATTENTION_VARIANTS``) takes the rotated q, k, v of one layer
and its cache buffers and returns the attention output and the new K/V; the subclasses differ
in the ops they export (standard ops, GroupQueryAttention, DHSA sparse prefill).
"""

from __future__ import annotations

from torch import nn

from edgert.model.config import DecoderConfig


class AttentionCore(nn.Module):
    """``h`` query heads, ``hkv`` KV heads of ``d`` channels, for layer ``layer_index``;
    ``softcap``: the scores' soft limit (0: none)."""

    def __init__(self, config: DecoderConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.h, self.hkv, self.d = (config.num_attention_heads, config.num_key_value_heads,
                                    config.head_dim)
        self.group = self.h // self.hkv
        self.softcap = float(config.attn_logit_softcapping)
        self.layer_index = layer_index
