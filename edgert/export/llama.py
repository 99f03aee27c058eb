"""Export-friendly Llama decoder: edgert's own definition, not transformers' modeling code.

One call processes ``q`` new tokens against a cached prefix of ``P`` tokens::

    input_ids [1,q] ──embed──> x [1,q,H]
    position_ids [1,q] ──> cos/sin [1,q,1,D]           (rotary, from positions: tree depth aware)
    tree_mask [1,1,q,q] (additive, 0 / -1e9)            (causal for prefill, ancestry for trees)
    for each layer i:
        x ─rmsnorm─> q,k,v ─rope─> core(q, k, v, past_key_i, past_value_i, ctx)
          -> attn, present_key_i, present_value_i
        x += o_proj(attn);  x += mlp(rmsnorm(x))
    hidden = rmsnorm(x)[:, logits_index]  ──lm_head──> logits [1,n,V]

The attention core (``/layers.i/self_attn/core``) comes from ``edgert.export.attention``:
``portable`` (standard ops, for TVM) or ``ort_gqa`` (ONNX Runtime GroupQueryAttention over the
runtime's fixed-capacity cache, read and written in place).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from edgert.artifact.manifest import GraphKey
from edgert.export.attention import ATTENTION_VARIANTS, AttentionVariant
from edgert.model.config import LlamaConfig
from edgert.model.rope import inverse_frequencies

MASK_VALUE = -1e9


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Rotary:
    """One step's rotary tables, shared by every layer. Standard ops: ``cos``/``sin``
    [1,q,1,D]. Fused (``positions`` set): ``cos``/``sin`` [q,D/2] of the step's positions and
    ``positions`` [1,q] = 0..q-1, the rows of those tables each token reads (com.microsoft
    RotaryEmbedding indexes its tables by position: giving it the step's own rows keeps tree
    depths exact without a table of every position)."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None = None


class _FusedRotary(torch.autograd.Function):
    """Eager: rotate-half rotary of x [1,q,heads*D]; export: one com.microsoft
    RotaryEmbedding node (non-interleaved, the layout Llama uses)."""

    @staticmethod
    def forward(ctx, x, positions, cos, sin, num_heads):
        q, width = x.shape[1], x.shape[2]
        heads = x.view(1, q, num_heads, width // num_heads)
        rows = positions.reshape(-1)
        full_cos = torch.cat([cos, cos], dim=-1)[rows][None, :, None, :]
        full_sin = torch.cat([sin, sin], dim=-1)[rows][None, :, None, :]
        return (heads * full_cos + rotate_half(heads) * full_sin).reshape(1, q, width)

    @staticmethod
    def symbolic(g, x, positions, cos, sin, num_heads):
        out = g.op("com.microsoft::RotaryEmbedding", x, positions, cos, sin,
                   num_heads_i=num_heads, interleaved_i=0)
        out.setType(x.type())
        return out


class Attention(nn.Module):
    """Projections + rotary around an attention core chosen from ``ATTENTION_CORES``."""

    def __init__(self, config: LlamaConfig, core: nn.Module) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.core = core

    def _rope(self, x, heads, rotary: Rotary):
        # x [1,q,heads*D] -> rotated, same layout (BSH): the layout attention kernels take
        if rotary.positions is not None:
            return _FusedRotary.apply(x, rotary.positions, rotary.cos, rotary.sin, heads)
        x = x.view(1, x.shape[1], heads, self.head_dim)
        return (x * rotary.cos + rotate_half(x) * rotary.sin).reshape(
            1, x.shape[1], heads * self.head_dim)

    def forward(self, x, rotary: Rotary, past_k, past_v, ctx):
        query = self._rope(self.q_proj(x), self.num_heads, rotary)
        key = self._rope(self.k_proj(x), self.num_kv_heads, rotary)
        value = self.v_proj(x)
        out, present_k, present_v = self.core(query, key, value, past_k, past_v, ctx)
        return self.o_proj(out), present_k, present_v


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, make_core) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, make_core(config))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rotary: Rotary, past_k, past_v, ctx):
        attn, k, v = self.self_attn(self.input_layernorm(x), rotary, past_k, past_v, ctx)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class LlamaDecoder(nn.Module):
    """The decode-step graph. Parameter names follow transformers' Llama state dict.

    The output projection is kept transposed, ``lm_head_t`` [H,V], so the exported MatMul reads
    it as stored (no folded transposed copy). With tied embeddings the token embedding is a
    Gather along axis 1 of that same tensor, so the 576 x 49152 matrix is stored once.
    """

    def __init__(self, config: LlamaConfig, attention: str = GraphKey.PORTABLE,
                 **core_options) -> None:
        super().__init__()
        self.config = config
        self.attention: AttentionVariant = ATTENTION_VARIANTS[attention]
        # prefill-only variants (DHSA) are traced with a chunk this long after a cached
        # prefix: full sparse blocks and a partial last one (every graph path)
        dhsa = core_options.get("dhsa")
        self.example_length = dhsa.budget + dhsa.block_size + 3 if dhsa is not None else 8
        chunked = dhsa is not None and dhsa.local >= dhsa.block_size  # else one call, P = 0
        self.example_past = 2 * dhsa.block_size if chunked else 0
        if not config.tie_word_embeddings:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head_t = nn.Parameter(torch.zeros(config.hidden_size, config.vocab_size))
        self.layers = nn.ModuleList(
            DecoderLayer(config, functools.partial(self.attention.core, layer_index=i,
                                                   **core_options))
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq = torch.tensor(inverse_frequencies(config), dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            # [H,V] gathered along V -> [H,q] -> [1,q,H]
            return self.lm_head_t.index_select(1, input_ids.reshape(-1)).t().unsqueeze(0)
        return self.embed_tokens(input_ids)

    def rotary(self, position_ids: torch.Tensor) -> Rotary:
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [1,q,D/2]
        if self.attention.fused_rotary:
            local = torch.arange(position_ids.shape[1], dtype=torch.int64).unsqueeze(0)
            return Rotary(freqs[0].cos(), freqs[0].sin(), local)
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)  # [1,q,1,D]
        return Rotary(emb.cos(), emb.sin())

    def forward(self, input_ids, position_ids, tree_mask, logits_index, *rest):
        """rest = (*extra inputs of the attention variant, past_key_0, past_value_0, ...);
        returns (logits [1,n,V], hidden [1,n,H], present_key_0, present_value_0, ...,
        *extra outputs of the variant)."""
        n_extra = len(self.attention.extra_inputs)
        extra, past = rest[:n_extra], rest[n_extra:]
        x = self.embed(input_ids)
        rotary = self.rotary(position_ids)
        ctx = self.attention.context(tree_mask, past[0], extra)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, rotary, past[2 * i], past[2 * i + 1], ctx)
            presents += [k, v]
        hidden = self.norm(x).index_select(1, logits_index)
        logits = torch.matmul(hidden, self.lm_head_t)
        return (logits, hidden, *presents, *self.attention.context_outputs(ctx))

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a transformers-style Llama state dict (``model.`` prefixes accepted)."""
        renamed = {name.removeprefix("model."): t for name, t in state.items()}
        if self.config.tie_word_embeddings:
            renamed.pop("lm_head.weight", None)
            embed = renamed.pop("embed_tokens.weight", None)
            if embed is not None:
                renamed["lm_head_t"] = embed.t().contiguous()
        elif "lm_head.weight" in renamed:
            renamed["lm_head_t"] = renamed.pop("lm_head.weight").t().contiguous()
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        missing = [m for m in missing if m != "inv_freq"]
        unexpected = [u for u in unexpected if not u.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            from edgert.errors import ModelSourceError

            raise ModelSourceError(
                f"weights do not match the Llama config: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}; is this a Llama-family checkpoint?")
