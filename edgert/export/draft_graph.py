"""The draft layer -> ``draft.onnx``: one draft call over its own fixed-capacity KV cache.

    input_ids [1,q] (x_{t+1}) ─embed (lm_head_t, shared with the decode graph)─┐
    features [1,q,F] (h_t: the backbone's, or the draft's own) ─────────────────┴─ draft layer
      (GroupQueryAttention over draft_past_key/value [1,Hkv,C,D], written in place at [P,P+q))
    ─> f [1,q,H] ─rows logits_index─> MatMul(draft_proj_t [H,V']) ─> log-softmax ─TopK─>
       draft_topk_ids [1,n,k] int64 (token ids), draft_topk_logprobs [1,n,k];
       draft_hidden [1,n,F]: f of those rows (the next draft row's feature)

F = H, or (1 + L)H for a draft with L ``feature_layers`` (EAGLE-3-style: the backbone's
residual stream after those layers follows h_t; ``draft_hidden`` has zeros there).

A row embedding token t+1 sits at position t+1. ``tree_mask`` masks the new rows: [1,1,q,q]
among themselves (causal; every cached entry visible), or [1,1,q,w] over the last w entries
(q < w <= P + q; the entries before are visible): a dynamic draft tree passes the rows drafted
this step, so each row sees the committed rows and its own ancestors among them, not its
cousins.
The projection ``draft_proj_t`` is lm_head's V' columns (stored in this graph at fp32; read
from lm_head's own blocks in quantized artifacts, like the Medusa heads').

``draft.portable.onnx`` is the same layer in standard ONNX ops (the portable attention core,
as in ``model.onnx``), for TVM: draft_past_key/value [1,Hkv,P,D] in, the q new entries out
(draft_present_key/value [1,Hkv,q,D]), the mask [1,1,q,q].
``passes.fuse_tree_attention`` (``mask="visibility"``) turns it into in-place kernels over
the draft's cache that take the mask at either width. Both graphs read the same tensors (by
name), stored once.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from edgert.artifact.manifest import WHOLE_BIAS_AXIS, GraphKey, GraphSpec, TensorSpec
from edgert.export.attention import ATTENTION_VARIANTS, fix_contrib_optional_inputs
from edgert.export.draft_layer import DraftLayer
from edgert.export.onnx_graph import OPSET, _readable_initializer_names
from edgert.model.config import DecoderConfig

DRAFT_FILE = "draft.onnx"
DRAFT_PORTABLE_FILE = "draft.portable.onnx"
DRAFT_PROJECTION, DRAFT_VOCAB_IDS = "draft_proj_t", "draft.vocab_ids"
ROW_INPUTS = ("input_ids", "features", "position_ids", "tree_mask", "logits_index")
DRAFT_OUTPUTS = ("draft_topk_ids", "draft_topk_logprobs", "draft_hidden")
PAST, PRESENT = ("draft_past_key", "draft_past_value"), ("draft_present_key",
                                                         "draft_present_value")


@dataclass(frozen=True)
class DraftForm:
    """One of the draft layer's two graphs: its file and attention core."""

    file: str
    variant: str  # ``edgert.export.attention.ATTENTION_VARIANTS``

    @property
    def inputs(self) -> tuple[str, ...]:
        return (*ROW_INPUTS, *ATTENTION_VARIANTS[self.variant].extra_inputs, *PAST)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (*DRAFT_OUTPUTS, *PRESENT)


DRAFT_FORMS = {
    GraphKey.DRAFT: DraftForm(DRAFT_FILE, GraphKey.ORT_GQA),
    GraphKey.DRAFT_PORTABLE: DraftForm(DRAFT_PORTABLE_FILE, GraphKey.PORTABLE),
}


class DraftStep(nn.Module):
    """Attribute names match the decode graph's (``lm_head_t``, ``embed_tokens``), so the
    exporter stores those tensors once for both graphs."""

    def __init__(self, trained: DraftLayer, backbone: DecoderConfig, lm_head_t: torch.Tensor,
                 topk: int, embedding: torch.Tensor | None = None,
                 variant: str = GraphKey.ORT_GQA) -> None:
        super().__init__()
        vocab_ids = getattr(trained, "vocab_ids", None)
        self.variant = ATTENTION_VARIANTS[variant]
        self.draft = DraftLayer(trained.config, self.variant.core, vocab_ids)
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

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        rows = (self.lm_head_t.index_select(1, ids).t() if self.tied
                else self.embed_tokens(ids))
        multiplier = self.backbone.embedding_multiplier
        return (rows * multiplier if multiplier != 1.0 else rows).unsqueeze(0)

    def forward(self, input_ids, features, position_ids, tree_mask, logits_index, *rest):
        *extra, past_key, past_value = rest  # the variant's extra inputs, then the cache
        ctx = self.variant.context(tree_mask, past_key, tuple(extra))
        rotary = self.draft.rotary(position_ids, fused=self.variant.fused_rotary)
        out, present_key, present_value = self.draft(features, self.embed(input_ids), rotary,
                                                     past_key, past_value, ctx)
        hidden = out.index_select(1, logits_index)
        logits = self.draft.logits(hidden, getattr(self, DRAFT_PROJECTION))
        values, index = torch.topk(torch.log_softmax(logits, dim=-1), self.topk, dim=-1)
        return (self.draft.to_vocab(index), values, self.draft.as_feature(hidden), present_key,
                present_value)


def trace_draft(trained: DraftLayer, backbone: DecoderConfig, lm_head_t: torch.Tensor,
                topk: int, embedding: torch.Tensor | None = None,
                key: GraphKey = GraphKey.DRAFT) -> onnx.ModelProto:
    """The draft graph of form ``key`` (``DRAFT_FORMS``)."""
    form = DRAFT_FORMS[key]
    variant = ATTENTION_VARIANTS[form.variant]
    module = DraftStep(trained, backbone, lm_head_t, topk, embedding, form.variant).eval()
    cfg = trained.config.decoder_config
    q, past = 3, 2
    cached = past + q + 2 if variant.shared_cache else past
    kv = torch.zeros((1, cfg.num_key_value_heads, cached, cfg.head_dim))
    example = (torch.zeros((1, q), dtype=torch.int64),
               torch.zeros((1, q, trained.config.feature_size)),
               torch.arange(past, past + q)[None], torch.zeros((1, 1, q, q)),
               torch.tensor([q - 1]), *variant.example_extra(q, past), kv, kv)
    cache_axis = {2: "capacity"} if variant.shared_cache else {2: "past"}
    present_axis = cache_axis if variant.shared_cache else {2: "q"}
    axes = {"input_ids": {1: "q"}, "features": {1: "q"}, "position_ids": {1: "q"},
            "tree_mask": {2: "q", 3: WHOLE_BIAS_AXIS if variant.shared_cache else "q"},
            "logits_index": {0: "n"},
            **{name: {1: "n"} for name in DRAFT_OUTPUTS},
            **{name: cache_axis for name in PAST},
            **{name: present_axis for name in PRESENT}}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buffer, input_names=list(form.inputs),
                          output_names=list(form.outputs), dynamic_axes=axes, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False,
                          custom_opsets={"com.microsoft": 1})
    proto = onnx.load_from_string(buffer.getvalue())
    _readable_initializer_names(proto)
    fix_contrib_optional_inputs(proto.graph)
    proto.producer_name = "edgert"
    return proto


def draft_graph_spec(trained: DraftLayer, topk: int, key: GraphKey = GraphKey.DRAFT
                     ) -> GraphSpec:
    form = DRAFT_FORMS[key]
    shared = ATTENTION_VARIANTS[form.variant].shared_cache
    cfg = trained.config.decoder_config
    h, hkv, d = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim
    width = trained.config.feature_size
    residual = (f", then the backbone's residual stream after layers "
                f"{list(trained.config.feature_layers)} (zeros on the draft's own rows)"
                if trained.config.feature_layers else "")
    (past_key, past_value), (present_key, present_value) = PAST, PRESENT
    if shared:
        mask = TensorSpec("tree_mask", [1, 1, "q", WHOLE_BIAS_AXIS], "float32",
                          "additive mask, 0 where a row may attend and -1e9 elsewhere: [q, q] "
                          "among the new rows (every cached entry visible), or [q, w] over the "
                          "the cached entries too (a dynamic draft tree's ancestry)")
        cache = [TensorSpec(past_key, [1, hkv, "capacity", d], "float32",
                            "the draft's key cache buffer, bound in place"),
                 TensorSpec(past_value, [1, hkv, "capacity", d], "float32",
                            "the draft's value cache buffer, bound in place")]
        presents = [TensorSpec(present_key, [1, hkv, "capacity", d], "float32",
                               f"the same buffer as {past_key}; the q new entries at [P, P+q)"),
                    TensorSpec(present_value, [1, hkv, "capacity", d], "float32",
                               f"the same buffer as {past_value}")]
        extra = [TensorSpec("seqlens_k", [1], "int32", "P + q - 1"),
                 TensorSpec("total_sequence_length", [], "int32", "P + q")]
    else:
        mask = TensorSpec("tree_mask", [1, 1, "q", "q"], "float32",
                          "additive mask among the new rows, 0 or -1e9 (every cached entry "
                          "visible); TVM's build also takes [q, w] over the last w entries")
        cache = [TensorSpec(past_key, [1, hkv, "past", d], "float32", "the draft's cached keys"),
                 TensorSpec(past_value, [1, hkv, "past", d], "float32",
                            "the draft's cached values")]
        presents = [TensorSpec(present_key, [1, hkv, "q", d], "float32",
                               "the keys of the q new rows"),
                    TensorSpec(present_value, [1, hkv, "q", d], "float32",
                               "the values of the q new rows")]
        extra = []
    return GraphSpec(
        file=form.file, attention=form.variant, shared_cache=shared,
        inputs=[
            TensorSpec("input_ids", [1, "q"], "int64", "token t+1 of each row"),
            TensorSpec("features", [1, "q", width], "float32",
                       "feature t of each row: the backbone's final-norm hidden state, or the "
                       f"draft's own draft_hidden{residual}"),
            TensorSpec("position_ids", [1, "q"], "int64", "t+1"),
            mask,
            TensorSpec("logits_index", ["n"], "int64", "rows to return drafts for"),
            *extra, *cache,
        ],
        outputs=[
            TensorSpec("draft_topk_ids", [1, "n", topk], "int64",
                       "the draft's top-k next tokens after each row, best first"),
            TensorSpec("draft_topk_logprobs", [1, "n", topk], "float32",
                       "their log-probabilities under the draft (over its output vocab)"),
            TensorSpec("draft_hidden", [1, "n", width], "float32",
                       "the draft's feature f_{t+1} (the next draft row's input)"
                       + (", zeros after the first " + str(h) if width > h else "")),
            *presents,
        ])
