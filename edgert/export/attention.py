"""Attention cores the decode graph can be exported with, in a registry.

Every core has the same call: ``core(query, key, value, past_k, past_v, ctx)`` with
query [1,q,Hq*D], key/value [1,q,Hkv*D] (rotary applied), returning
``(out [1,q,Hq*D], present_k, present_v)``. ``ctx`` is built once per step by the variant.

``portable`` (model.onnx: standard ONNX ops; what TVM imports and edgert's Relax passes match)::

    past_k [1,Hkv,P,D] ─┐
    key ─reshape/T──────┴─Concat─> K [1,Hkv,P+q,D] ─repeat(Hq/Hkv)─┐
    query ─reshape/T─────────────────────────────── MatMul(q, K^T)*scale + bias ─Softmax─ MatMul(V)
    bias = [zeros(q,P) | tree_mask]                 present_k/v = new entries only [1,Hkv,q,D]

``ort_gqa`` (model.ort.onnx: ONNX Runtime's com.microsoft GroupQueryAttention)::

    past_k/v [1,Hkv,C,D]  = the runtime's fixed-capacity cache, bound as input AND output
    GQA(query, key, value, past_k, past_v, seqlens_k=T-1, total_sequence_length=T, bias)
    writes the q new entries at [P, T) in place; causal mask built in, tree ancestry via bias
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgert.artifact.manifest import GraphKey
from edgert.export.attention_core import AttentionCore


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(1, x.shape[1], heads, head_dim).transpose(1, 2)  # [1,heads,q,D]


def dense_attention(query, keys, values, bias, num_heads, num_kv_heads, head_dim,
                    softcap: float = 0.0):
    """softmax(cap(q K^T / sqrt(D)) + bias) V with GQA head repetition, cap(s) =
    c*tanh(s/c) when ``softcap`` c > 0; returns [1,q,Hq*D]."""
    q = _split_heads(query, num_heads, head_dim)
    group = num_heads // num_kv_heads
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(2, 3)) * (1.0 / math.sqrt(head_dim))
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), values)  # [1,Hq,q,D]
    return out.transpose(1, 2).reshape(1, query.shape[1], num_heads * head_dim)


class PortableCore(AttentionCore):
    def forward(self, query, key, value, past_k, past_v, bias):
        k = _split_heads(key, self.hkv, self.d)
        v = _split_heads(value, self.hkv, self.d)
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        out = dense_attention(query, keys, values, bias, self.h, self.hkv, self.d, self.softcap)
        return out, k, v


class _GroupQueryAttention(torch.autograd.Function):
    """Eager: GQA semantics over a shared cache (used for tracing and as a torch reference).
    Export: one com.microsoft GroupQueryAttention node."""

    @staticmethod
    def forward(ctx, query, key, value, past_k, past_v, seqlens_k, total_len, bias,
                num_heads, num_kv_heads, head_dim, softcap):
        q_len = query.shape[1]
        total = int(total_len)
        past = total - q_len
        present_k = past_k.clone()
        present_v = past_v.clone()
        present_k[:, :, past:total] = _split_heads(key, num_kv_heads, head_dim)
        present_v[:, :, past:total] = _split_heads(value, num_kv_heads, head_dim)
        causal = torch.triu(torch.full((q_len, total), -torch.inf), diagonal=past + 1)
        out = dense_attention(query, present_k[:, :, :total], present_v[:, :, :total],
                              bias + causal, num_heads, num_kv_heads, head_dim, softcap)
        return out, present_k, present_v

    @staticmethod
    def symbolic(g, query, key, value, past_k, past_v, seqlens_k, total_len, bias,
                 num_heads, num_kv_heads, head_dim, softcap):
        # The TorchScript exporter cannot emit empty optional inputs; the bias goes in slot 7
        # here and fix_contrib_optional_inputs() moves it to slot 10 (after cos, sin, position_ids).
        capped = {"softcap_f": softcap} if softcap else {}
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            query, key, value, past_k, past_v, seqlens_k, total_len, bias,
            num_heads_i=num_heads, kv_num_heads_i=num_kv_heads, do_rotary_i=0,
            outputs=3, **capped,
        )
        out.setType(query.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


GQA_BIAS_SLOT = 10


MHA_BIAS_SLOT = 5


def fix_contrib_optional_inputs(graph) -> None:
    """Move the bias the exporter put right after the required inputs to its real slot:
    GroupQueryAttention 7 -> 10 (no rotary caches), MultiHeadAttention 3 -> 5 (no projection
    bias, no key padding mask)."""
    for node in graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) == 8:
            bias = node.input[7]
            node.input[7:] = [""] * (GQA_BIAS_SLOT - 7) + [bias]
        elif node.op_type == "MultiHeadAttention" and len(node.input) == 4:
            bias = node.input[3]
            node.input[3:] = [""] * (MHA_BIAS_SLOT - 3) + [bias]


class GQACore(AttentionCore):
    def forward(self, query, key, value, past_k, past_v, ctx):
        seqlens_k, total_len, bias = ctx
        return _GroupQueryAttention.apply(query, key, value, past_k, past_v, seqlens_k,
                                          total_len, bias, self.h, self.hkv, self.d,
                                          self.softcap)


class _TreeBias(torch.autograd.Function):
    """[1,1,q,T] additive bias: zeros over the first T-w columns, then the [1,1,q,w] mask.

    w = q: the tree mask over the new tokens (every cached entry visible); w = T: a whole
    bias, cached entries included (several sequences sharing the cache: each row sees only
    its own sequence's entries)."""

    @staticmethod
    def forward(ctx, tree_mask, total_len):
        q_len, width = tree_mask.shape[2], tree_mask.shape[3]
        past = torch.zeros((1, 1, q_len, int(total_len) - width), dtype=tree_mask.dtype)
        return torch.cat([past, tree_mask], dim=3)

    @staticmethod
    def symbolic(g, tree_mask, total_len):
        def const(values):
            return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

        shape = g.op("Shape", tree_mask)
        q_len = g.op("Slice", shape, const([2]), const([3]))
        width = g.op("Slice", shape, const([3]), const([4]))
        total = g.op("Reshape", g.op("Cast", total_len, to_i=7), const([1]))  # int64 [1]
        past = g.op("Sub", total, width)
        zeros_shape = g.op("Concat", const([1, 1]), q_len, past, axis_i=0)
        zeros = g.op("ConstantOfShape", zeros_shape,
                     value_t=torch.tensor([0.0], dtype=torch.float32))
        return g.op("Concat", zeros, tree_mask, axis_i=3)


def _portable_context(tree_mask, past_k0, extra):
    past = torch.zeros((1, 1, tree_mask.shape[2], past_k0.shape[2]), dtype=tree_mask.dtype)
    return torch.cat([past, tree_mask], dim=3)


def _gqa_context(tree_mask, past_k0, extra):
    seqlens_k, total_len = extra
    return (seqlens_k, total_len, _TreeBias.apply(tree_mask, total_len))


@dataclass(frozen=True)
class AttentionVariant:
    """How one exported graph does attention, and which extra inputs it takes."""

    name: str
    core: Callable[..., nn.Module]
    extra_inputs: tuple[str, ...]
    shared_cache: bool  # True: past/present are the runtime's capacity-sized buffers, aliased
    context: Callable  # (tree_mask, past_key_0, extra inputs) -> ctx passed to every core
    example_extra: Callable[[int, int], list[torch.Tensor]]  # (q, past) -> extra inputs
    # a prefill graph (DHSA): one call per prompt chunk, the cache buffers bound in place as
    # past inputs and present outputs (the chunk's K/V written at [P, P+q))
    prefill_only: bool = False
    extra_outputs: tuple[str, ...] = ()
    context_outputs: Callable = lambda ctx: ()  # ctx -> the extra outputs
    # rotary as one com.microsoft RotaryEmbedding per q/k (ONNX Runtime graphs) instead of
    # nine standard ops
    fused_rotary: bool = False


def _dhsa_core(config, layer_index=0, **options):
    from edgert.export.dhsa_attention import DHSACore

    return DHSACore(config, layer_index, **options)


def _dhsa_context(tree_mask, past_k0, extra):
    from edgert.export.dhsa_attention import dhsa_context

    return dhsa_context(tree_mask, past_k0, extra)


def _dhsa_example_extra(q: int, past: int) -> list[torch.Tensor]:
    past_starts = torch.zeros(past, dtype=torch.bool)
    past_starts[:1] = True
    return [torch.tensor(0, dtype=torch.int64), torch.tensor(past + q, dtype=torch.int64),
            past_starts]


ATTENTION_VARIANTS: dict[str, AttentionVariant] = {
    GraphKey.PORTABLE: AttentionVariant(GraphKey.PORTABLE, PortableCore, (), False,
                                        _portable_context, lambda q, past: []),
    GraphKey.ORT_GQA: AttentionVariant(
        GraphKey.ORT_GQA, GQACore, ("seqlens_k", "total_sequence_length"), True, _gqa_context,
        lambda q, past: [torch.tensor([past + q - 1], dtype=torch.int32),
                         torch.tensor(past + q, dtype=torch.int32)], fused_rotary=True),
    # prefill calls (a prompt chunk against the cache), DHSA sparse attention in every layer
    GraphKey.DHSA: AttentionVariant(
        GraphKey.DHSA, _dhsa_core, ("dhsa_fixed_chunk", "prompt_length", "past_chunk_starts"),
        False, _dhsa_context, _dhsa_example_extra, prefill_only=True,
        extra_outputs=("chunk_starts",), context_outputs=lambda ctx: (ctx["starts"],)),
}
