"""The draft layer -> ``draft.onnx``: one draft call over its own fixed-capacity KV cache.

    input_ids [1,q] (x_{t+1}) ─embed (lm_head_t, shared with the decode graph)─┐
    features [1,q,H] (h_t: the backbone's, or the draft's own) ─────────────────┴─ draft layer
      (GroupQueryAttention over draft_past_key/value [1,Hkv,C,D], written in place at [P,P+q))
    ─> f [1,q,H] ─rows logits_index─> draft_hidden [1,n,H] ─MatMul(draft_proj_t [H,V'])─>
       log-softmax ─TopK─> draft_topk_ids [1,n,k] int64 (token ids), draft_topk_logprobs [1,n,k]

A row embedding token t+1 sits at position t+1. ``tree_mask`` masks the new rows: [1,1,q,q]
among themselves (causal; every cached entry visible), or [1,1,q,P+q] over the cached entries
too (a dynamic draft tree: each row sees the committed rows and its own ancestors among the
rows drafted this step, not its cousins).
The projection ``draft_proj_t`` is lm_head's V' columns (stored in this graph at fp32; read
from lm_head's own blocks in quantized artifacts, like the Medusa heads').
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import nn

from edgert.artifact.manifest import WHOLE_BIAS_AXIS, GraphSpec, TensorSpec
from edgert.export.attention import ATTENTION_VARIANTS, GQACore, fix_contrib_optional_inputs
from edgert.export.draft_layer import DraftLayer
from edgert.export.onnx_graph import OPSET, _readable_initializer_names
from edgert.model.config import DecoderConfig

DRAFT_FILE = "draft.onnx"
DRAFT_PROJECTION, DRAFT_VOCAB_IDS = "draft_proj_t", "draft.vocab_ids"
INPUTS = ("input_ids", "features", "position_ids", "tree_mask", "logits_index", "seqlens_k",
          "total_sequence_length", "draft_past_key", "draft_past_value")
OUTPUTS = ("draft_topk_ids", "draft_topk_logprobs", "draft_hidden", "draft_present_key",
           "draft_present_value")


class DraftStep(nn.Module):
    """Attribute names match the decode graph's (``lm_head_t``, ``embed_tokens``), so the
    exporter stores those tensors once for both graphs."""

    def __init__(self, trained: DraftLayer, backbone: DecoderConfig, lm_head_t: torch.Tensor,
                 topk: int, embedding: torch.Tensor | None = None) -> None:
        super().__init__()
        vocab_ids = getattr(trained, "vocab_ids", None)
        self.draft = DraftLayer(trained.config, GQACore, vocab_ids)
        self.draft.load_state_dict(trained.state_dict())
        self.backbone = backbone
        self.topk = topk
        self.tied = embedding is None
        if self.tied:
            self.lm_head_t = nn.Parameter(lm_head_t.detach().clone(), requires_grad=False)
        else:
            self.embed_tokens = nn.Embedding.from_pretrained(embedding.detach().clone())
        setattr(self, DRAFT_PROJECTION, nn.Parameter(
            self.draft.select_vocab(lm_head_t.detach()).clone(), requires_grad=False))
        self.variant = ATTENTION_VARIANTS["ort_gqa"]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        rows = (self.lm_head_t.index_select(1, ids).t() if self.tied
                else self.embed_tokens(ids))
        multiplier = self.backbone.embedding_multiplier
        return (rows * multiplier if multiplier != 1.0 else rows).unsqueeze(0)

    def forward(self, input_ids, features, position_ids, tree_mask, logits_index, seqlens_k,
                total_sequence_length, past_key, past_value):
        ctx = self.variant.context(tree_mask, past_key, (seqlens_k, total_sequence_length))
        rotary = self.draft.rotary(position_ids, fused=True)
        out, present_key, present_value = self.draft(features, self.embed(input_ids), rotary,
                                                     past_key, past_value, ctx)
        hidden = out.index_select(1, logits_index)
        logits = self.draft.logits(hidden, getattr(self, DRAFT_PROJECTION))
        values, index = torch.topk(torch.log_softmax(logits, dim=-1), self.topk, dim=-1)
        return self.draft.to_vocab(index), values, hidden, present_key, present_value


def trace_draft(trained: DraftLayer, backbone: DecoderConfig, lm_head_t: torch.Tensor,
                topk: int, embedding: torch.Tensor | None = None) -> onnx.ModelProto:
    module = DraftStep(trained, backbone, lm_head_t, topk, embedding).eval()
    cfg = trained.config.decoder_config
    q, past = 3, 2
    kv = torch.zeros((1, cfg.num_key_value_heads, past + q + 2, cfg.head_dim))
    example = (torch.zeros((1, q), dtype=torch.int64), torch.zeros((1, q, cfg.hidden_size)),
               torch.arange(past, past + q)[None], torch.zeros((1, 1, q, q)),
               torch.tensor([q - 1]), torch.tensor([past + q - 1], dtype=torch.int32),
               torch.tensor(past + q, dtype=torch.int32), kv, kv)
    axes = {"input_ids": {1: "q"}, "features": {1: "q"}, "position_ids": {1: "q"},
            "tree_mask": {2: "q", 3: WHOLE_BIAS_AXIS}, "logits_index": {0: "n"},
            "draft_topk_ids": {1: "n"}, "draft_topk_logprobs": {1: "n"}, "draft_hidden": {1: "n"},
            "draft_past_key": {2: "capacity"}, "draft_past_value": {2: "capacity"},
            "draft_present_key": {2: "capacity"}, "draft_present_value": {2: "capacity"}}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buffer, input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False,
                          custom_opsets={"com.microsoft": 1})
    proto = onnx.load_from_string(buffer.getvalue())
    _readable_initializer_names(proto)
    fix_contrib_optional_inputs(proto.graph)
    proto.producer_name = "edgert"
    return proto


def draft_graph_spec(trained: DraftLayer, topk: int) -> GraphSpec:
    cfg = trained.config.decoder_config
    h, hkv, d = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim
    return GraphSpec(
        file=DRAFT_FILE, attention="ort_gqa", shared_cache=True,
        inputs=[
            TensorSpec("input_ids", [1, "q"], "int64", "token t+1 of each row"),
            TensorSpec("features", [1, "q", h], "float32",
                       "feature t of each row: the backbone's final-norm hidden state, or the "
                       "draft's own draft_hidden"),
            TensorSpec("position_ids", [1, "q"], "int64", "t+1"),
            TensorSpec("tree_mask", [1, 1, "q", WHOLE_BIAS_AXIS], "float32",
                       "additive mask, 0 where a row may attend and -1e9 elsewhere: [q, q] "
                       "among the new rows (every cached entry visible), or [q, P + q] over the "
                       "cached entries too (a dynamic draft tree's ancestry)"),
            TensorSpec("logits_index", ["n"], "int64", "rows to return drafts for"),
            TensorSpec("seqlens_k", [1], "int32", "P + q - 1"),
            TensorSpec("total_sequence_length", [], "int32", "P + q"),
            TensorSpec("draft_past_key", [1, hkv, "capacity", d], "float32",
                       "the draft's key cache buffer, bound in place"),
            TensorSpec("draft_past_value", [1, hkv, "capacity", d], "float32",
                       "the draft's value cache buffer, bound in place"),
        ],
        outputs=[
            TensorSpec("draft_topk_ids", [1, "n", topk], "int64",
                       "the draft's top-k next tokens after each row, best first"),
            TensorSpec("draft_topk_logprobs", [1, "n", topk], "float32",
                       "their log-probabilities under the draft (over its output vocab)"),
            TensorSpec("draft_hidden", [1, "n", h], "float32",
                       "the draft's feature f_{t+1} (the next draft row's input)"),
            TensorSpec("draft_present_key", [1, hkv, "capacity", d], "float32",
                       "the same buffer as draft_past_key; the q new entries at [P, P+q)"),
            TensorSpec("draft_present_value", [1, hkv, "capacity", d], "float32",
                       "the same buffer as draft_past_value"),
        ])
