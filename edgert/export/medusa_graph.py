"""Medusa heads -> ``medusa.onnx``: hidden states in, each head's top-k tokens out.

    hidden [n,H] ─> head_i blocks ─> [K,n,H] ─MatMul(lm_head_t [H,V], shared with model.onnx)─>
    logits [K,n,V] ─TopK(k)─> medusa_topk_ids [K,n,k] int64, medusa_topk_logits [K,n,k] float32

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

from edgert.export.onnx_graph import OPSET, _readable_initializer_names
from edgert.manifest import GraphSpec, TensorSpec
from edgert.medusa.heads import MedusaHeads

MEDUSA_FILE = "medusa.onnx"


class MedusaTopK(nn.Module):
    def __init__(self, heads: MedusaHeads, lm_head_t: torch.Tensor, topk: int) -> None:
        super().__init__()
        self.heads = heads
        self.lm_head_t = nn.Parameter(lm_head_t.detach().clone(), requires_grad=False)
        self.topk = topk

    def forward(self, hidden: torch.Tensor):
        logits = self.heads(hidden, self.lm_head_t)  # [K,n,V]
        values, ids = torch.topk(logits, self.topk, dim=-1)
        return ids, values


def trace_medusa(heads: MedusaHeads, lm_head_t: torch.Tensor, topk: int) -> onnx.ModelProto:
    module = MedusaTopK(heads, lm_head_t, topk).eval()
    example = torch.zeros((2, heads.config.hidden_size))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, input_names=["hidden"],
                          output_names=["medusa_topk_ids", "medusa_topk_logits"],
                          dynamic_axes={"hidden": {0: "n"}, "medusa_topk_ids": {1: "n"},
                                        "medusa_topk_logits": {1: "n"}},
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
                           "final-norm hidden states (the decode graph's `hidden` output)")],
        outputs=[
            TensorSpec("medusa_topk_ids", [cfg.num_heads, "n", topk], "int64",
                       "head i's top-k token ids for the token at t+i+2, best first"),
            TensorSpec("medusa_topk_logits", [cfg.num_heads, "n", topk], "float32",
                       "the matching head logits"),
        ])
