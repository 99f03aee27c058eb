"""Medusa heads -> ``medusa.onnx``: hidden states in, each head's top-k tokens out.

    hidden [n,H] ─> head_i blocks ─> [K,n,H] ─MatMul(lm_head_t [H,V], shared with model.onnx)─>
    logits [K,n,V] ─TopK(k)─> medusa_topk_ids [K,n,k] int64, medusa_topk_logits [K,n,k] float32

Token-conditioned heads take a second input, ``root`` [n] int64 (the token the backbone chose
after each hidden state), embedded with the backbone's own embedding (shared with model.onnx).
With an output vocab the projection is ``medusa_proj_t`` [H,V'] (lm_head's V' columns, stored
in this graph) and the top-k positions are mapped back to token ids through ``vocab_ids``.

A graph of its own because the heads must run on the hidden state of the last *accepted*
token, known only after the verification forward; running them on every tree position inside
that forward would cost K x tree-size vocab projections.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import nn

from edgert.artifact.manifest import GraphSpec, TensorSpec
from edgert.export.onnx_graph import OPSET, _readable_initializer_names
from edgert.model.medusa_heads import MedusaHeads

MEDUSA_FILE = "medusa.onnx"


class MedusaTopK(nn.Module):
    """Attribute names match the decode graph's (``lm_head_t``, ``embed_tokens``), so the
    exporter stores those tensors once for both graphs."""

    def __init__(self, heads: MedusaHeads, lm_head_t: torch.Tensor, topk: int,
                 embedding: torch.Tensor | None = None) -> None:
        super().__init__()
        cfg = heads.config
        self.heads = heads
        self.topk = topk
        self.tied = embedding is None
        needs_lm_head = (cfg.projection == "shared" and not cfg.output_vocab) or (
            cfg.condition == "token" and self.tied)
        if needs_lm_head:
            self.lm_head_t = nn.Parameter(lm_head_t.detach().clone(), requires_grad=False)
        if cfg.projection == "shared" and cfg.output_vocab:
            self.medusa_proj_t = nn.Parameter(heads.select_vocab(lm_head_t.detach()).clone(),
                                              requires_grad=False)
        if cfg.condition == "token" and not self.tied:
            self.embed_tokens = nn.Embedding.from_pretrained(embedding.detach().clone())

    def _projection(self) -> torch.Tensor | None:
        if self.heads.config.projection != "shared":
            return None
        return self.medusa_proj_t if self.heads.config.output_vocab else self.lm_head_t

    def forward(self, hidden: torch.Tensor, root: torch.Tensor | None = None):
        embedded = None
        if root is not None:
            embedded = (self.lm_head_t.index_select(1, root).t() if self.tied
                        else self.embed_tokens(root))
        logits = self.heads(hidden, self._projection(), embedded)  # [K,n,V']
        values, index = torch.topk(logits, self.topk, dim=-1)
        return self.heads.to_vocab(index), values


def trace_medusa(heads: MedusaHeads, lm_head_t: torch.Tensor, topk: int,
                 embedding: torch.Tensor | None = None) -> onnx.ModelProto:
    """``embedding`` [V,H]: the backbone's token embedding when it is not tied to lm_head
    (only read by token-conditioned heads)."""
    module = MedusaTopK(heads, lm_head_t, topk, embedding).eval()
    example = (torch.zeros((2, heads.config.hidden_size)),)
    names = ["hidden"]
    axes = {"hidden": {0: "n"}, "medusa_topk_ids": {1: "n"}, "medusa_topk_logits": {1: "n"}}
    if heads.config.condition == "token":
        example += (torch.zeros(2, dtype=torch.int64),)
        names.append("root")
        axes["root"] = {0: "n"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buffer, input_names=names,
                          output_names=["medusa_topk_ids", "medusa_topk_logits"],
                          dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    _readable_initializer_names(proto)
    proto.producer_name = "edgert"
    return proto


def medusa_graph_spec(heads: MedusaHeads, topk: int) -> GraphSpec:
    cfg = heads.config
    return GraphSpec(
        file=MEDUSA_FILE, attention="none", shared_cache=False,
        inputs=[TensorSpec("hidden", ["n", cfg.hidden_size], "float32",
                           "final-norm hidden states (the decode graph's `hidden` output)"),
                *([TensorSpec("root", ["n"], "int64",
                              "the token the backbone chose after each hidden state")]
                  if cfg.condition == "token" else [])],
        outputs=[
            TensorSpec("medusa_topk_ids", [cfg.num_heads, "n", topk], "int64",
                       "head i's top-k token ids for the token at t+i+2, best first"),
            TensorSpec("medusa_topk_logits", [cfg.num_heads, "n", topk], "float32",
                       "the matching head logits"),
        ])
