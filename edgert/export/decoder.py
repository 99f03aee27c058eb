"""Export-friendly decoder: edgert's own definition, not transformers' modeling code.

One definition serves every supported family (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2):
the typed config's switches (``edgert.model.config``) add projection biases, per-head q/k
norms, Gemma's norms, activation, embedding multiplier and soft-capping. One call processes
``q`` new tokens against a cached prefix of ``P`` tokens::

    input_ids [1,q] ──embed──> x [1,q,H]                (x embedding_multiplier)
    position_ids [1,q] ──> cos/sin [1,q,1,D]           (rotary, from positions: tree depth aware)
    tree_mask [1,1,q,q] (additive, 0 / -1e9)            (causal for prefill, ancestry for trees)
    for each layer i:
        x ─rmsnorm─> q,k,v (─q/k norm─) ─rope─> core(q, k, v, past_key_i, past_value_i, ctx)
          -> attn, present_key_i, present_value_i
        x += o_proj(attn);  x += mlp(rmsnorm(x))        (Gemma 2: a norm after each as well)
    hidden = rmsnorm(x)[:, logits_index]  ──lm_head──> logits [1,n,V]   (soft-capped: Gemma 2)

The attention core (``/layers.i/self_attn/core``) comes from ``edgert.export.attention``:
``portable`` (standard ops, for TVM) or ``ort_gqa`` (ONNX Runtime GroupQueryAttention over the
runtime's fixed-capacity cache, read and written in place). A query scale other than
1/sqrt(D) is one multiply of the projected queries, so every core keeps its 1/sqrt(D).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from edgert.artifact.manifest import GraphKey
from edgert.export.attention import ATTENTION_VARIANTS, AttentionVariant
from edgert.model.config import DecoderConfig
from edgert.model.rope import inverse_frequencies

MASK_VALUE = -1e9


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight): offset 0 in Llama, 1 in Gemma."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        scale = self.weight + self.offset if self.offset else self.weight
        return x * torch.rsqrt(variance + self.eps) * scale


def norm(config: DecoderConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or config.hidden_size, config.rms_norm_eps, config.norm_weight_offset)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): Gemma 2's soft limit on logits; identity when cap is 0."""
    return torch.tanh(x / cap) * cap if cap else x


ACTIVATIONS = {
    "silu": nn.functional.silu,
    "gelu_tanh": functools.partial(nn.functional.gelu, approximate="tanh"),
}


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


def rotary_tables(inv_freq: torch.Tensor, position_ids: torch.Tensor, fused: bool) -> Rotary:
    """The step's rotary tables for ``position_ids`` [1,q] (``fused``: for RotaryEmbedding)."""
    freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq  # [1,q,D/2]
    if fused:
        local = torch.arange(position_ids.shape[1], dtype=torch.int64).unsqueeze(0)
        return Rotary(freqs[0].cos(), freqs[0].sin(), local)
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)  # [1,q,1,D]
    return Rotary(emb.cos(), emb.sin())


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

    def __init__(self, config: DecoderConfig, core: nn.Module) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.attention_output_bias)
        if config.qk_norm:
            self.q_norm = norm(config, d)
            self.k_norm = norm(config, d)
        # the cores scale scores by 1/sqrt(D); another scale multiplies the queries instead
        self.query_multiplier = (config.query_scale * math.sqrt(d)
                                 if config.query_scale else 1.0)
        self.core = core

    def _head_norm(self, name: str, x: torch.Tensor, heads: int) -> torch.Tensor:
        head_norm = getattr(self, name, None)
        if head_norm is None:
            return x
        q = x.shape[1]
        return head_norm(x.view(1, q, heads, self.head_dim)).reshape(1, q, heads * self.head_dim)

    def _rope(self, x, heads, rotary: Rotary):
        # x [1,q,heads*D] -> rotated, same layout (BSH): the layout attention kernels take
        if rotary.positions is not None:
            return _FusedRotary.apply(x, rotary.positions, rotary.cos, rotary.sin, heads)
        x = x.view(1, x.shape[1], heads, self.head_dim)
        return (x * rotary.cos + rotate_half(x) * rotary.sin).reshape(
            1, x.shape[1], heads * self.head_dim)

    def forward(self, x, rotary: Rotary, past_k, past_v, ctx):
        query = self._head_norm("q_norm", self.q_proj(x), self.num_heads)
        if self.query_multiplier != 1.0:
            query = query * self.query_multiplier
        query = self._rope(query, self.num_heads, rotary)
        key = self._rope(self._head_norm("k_norm", self.k_proj(x), self.num_kv_heads),
                         self.num_kv_heads, rotary)
        value = self.v_proj(x)
        out, present_k, present_v = self.core(query, key, value, past_k, past_v, ctx)
        return self.o_proj(out), present_k, present_v


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block. Names follow transformers: with ``sandwich_norms`` (Gemma 2)
    ``post_attention_layernorm`` normalizes the attention output and two more norms wrap the
    MLP; otherwise it is the MLP's input norm."""

    def __init__(self, config: DecoderConfig, make_core) -> None:
        super().__init__()
        self.sandwich = config.sandwich_norms
        self.input_layernorm = norm(config)
        self.self_attn = Attention(config, make_core(config))
        self.post_attention_layernorm = norm(config)
        if self.sandwich:
            self.pre_feedforward_layernorm = norm(config)
            self.post_feedforward_layernorm = norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rotary: Rotary, past_k, past_v, ctx):
        attn, k, v = self.self_attn(self.input_layernorm(x), rotary, past_k, past_v, ctx)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class Decoder(nn.Module):
    """The decode-step graph. Parameter names follow transformers' Llama state dict.

    The output projection is kept transposed, ``lm_head_t`` [H,V], so the exported MatMul reads
    it as stored (no folded transposed copy). With tied embeddings the token embedding is a
    Gather along axis 1 of that same tensor, so the 576 x 49152 matrix is stored once.
    """

    def __init__(self, config: DecoderConfig, attention: str = GraphKey.PORTABLE,
                 features: bool = False, feature_layers: tuple[int, ...] = (),
                 **core_options) -> None:
        super().__init__()
        self.config = config
        # an extra output, ``features`` [1,q,H]: every row's final-norm hidden state (what
        # the draft layer reads; ``hidden`` has only the logits rows), then [1,q,H] more per
        # ``feature_layers``: the residual stream after that many layers (a multi-layer draft)
        self.features_output = features
        self.feature_layers = tuple(feature_layers)
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
        self.norm = norm(config)
        inv_freq = torch.tensor(inverse_frequencies(config), dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            # [H,V] gathered along V -> [H,q] -> [1,q,H]
            x = self.lm_head_t.index_select(1, input_ids.reshape(-1)).t().unsqueeze(0)
        else:
            x = self.embed_tokens(input_ids)
        multiplier = self.config.embedding_multiplier
        return x * multiplier if multiplier != 1.0 else x

    def rotary(self, position_ids: torch.Tensor) -> Rotary:
        return rotary_tables(self.inv_freq, position_ids, self.attention.fused_rotary)

    def forward(self, input_ids, position_ids, tree_mask, logits_index, *rest):
        """rest = (*extra inputs of the attention variant, past_key_0, past_value_0, ...);
        returns (logits [1,n,V], hidden [1,n,H], present_key_0, present_value_0, ...,
        *extra outputs of the variant, features [1,q,(1 + len(feature_layers))H] when
        ``features``)."""
        n_extra = len(self.attention.extra_inputs)
        extra, past = rest[:n_extra], rest[n_extra:]
        x = self.embed(input_ids)
        rotary = self.rotary(position_ids)
        ctx = self.attention.context(tree_mask, past[0], extra)
        presents, residual = [], {}
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, rotary, past[2 * i], past[2 * i + 1], ctx)
            presents += [k, v]
            if i + 1 in self.feature_layers:
                residual[i + 1] = x
        normed = self.norm(x)
        hidden = normed.index_select(1, logits_index)
        logits = softcap(torch.matmul(hidden, self.lm_head_t), self.config.final_logit_softcapping)
        features = ()
        if self.features_output:
            features = (torch.cat([normed, *(residual[k] for k in self.feature_layers)], dim=-1)
                        if self.feature_layers else normed,)
        return (logits, hidden, *presents, *self.attention.context_outputs(ctx), *features)

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a transformers-style state dict (``model.`` prefixes accepted)."""
        renamed = {name.removeprefix("model."): t for name, t in state.items()}
        if self.config.tie_word_embeddings:
            renamed.pop("lm_head.weight", None)
            embed = renamed.pop("embed_tokens.weight", None)
            if embed is not None:
                renamed["lm_head_t"] = embed.t().contiguous()
        elif "lm_head.weight" in renamed:
            renamed["lm_head_t"] = renamed.pop("lm_head.weight").t().contiguous()
        # assign: the parameters are the loaded tensors themselves, not a second copy
        missing, unexpected = self.load_state_dict(renamed, strict=False, assign=True)
        missing = [m for m in missing if m != "inv_freq"]
        unexpected = [u for u in unexpected if not u.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            from edgert.errors import ModelSourceError

            raise ModelSourceError(
                f"weights do not match the model config: missing "
                f"{missing[:4]}, unexpected {unexpected[:4]}; do the weights belong to this "
                "config.json?")
