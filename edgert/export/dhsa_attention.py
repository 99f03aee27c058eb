"""DHSA prefill attention core in export-friendly torch (standard ONNX ops: CumSum,
ScatterElements(add), MaxPool, TopK, Gather, MatMul, Softmax). Mirrors
``edgert.dhsa.reference`` step for step; exported as ``model.dhsa.onnx`` (whole prompt in one
call, no past). Every layer's core is one subgraph under ``/layers.i/self_attn/core`` so a TVM
pass can find it and lower it into one fused kernel.

    boundary layer: probe attention -> mass ratios -> NMS (MaxPool) -> chunk starts [T] (shared)
    every layer:    chunk ids = CumSum(starts)-1 -> chunk sums (ScatterElements add) / sqrt(len)
                    block vectors [nb,D] . chunk vectors -> Gather(ids) -> token scores [nb,T]
                    + causal/local/sink masks -> TopK(budget) -> Gather K/V [Hkv,nb,budget,D]
                    -> MatMul/Softmax/MatMul per block; last dense_tail queries dense
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgert.config import LlamaConfig
from edgert.dhsa.params import DHSAParams

NEG_INF = float("-inf")


def _repeat(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.repeat_interleave(group, dim=0) if group > 1 else x


class DHSACore(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int = 0,
                 dhsa: DHSAParams | None = None) -> None:
        super().__init__()
        self.h, self.hkv, self.d = (config.num_attention_heads, config.num_key_value_heads,
                                    config.head_dim)
        self.group = self.h // self.hkv
        self.layer_index = layer_index
        self.p = dhsa or DHSAParams()

    # -- boundaries ---------------------------------------------------------------------
    def chunk_starts(self, q, k, fixed_chunk):
        p = self.p
        seq_len = q.shape[1]
        w = p.boundary_window
        t = torch.arange(seq_len)
        tail = max(p.dense_tail, 1)
        rows = torch.cat([torch.arange(p.probe_stride - 1, seq_len - tail, p.probe_stride),
                          torch.arange(seq_len - tail, seq_len)])
        keys = _repeat(k, self.group)
        scores = torch.matmul(q.index_select(1, rows), keys.transpose(1, 2)) / math.sqrt(self.d)
        scores = scores.masked_fill(t[None, None, :] > rows[None, :, None], NEG_INF)
        attn = torch.softmax(scores, dim=-1).mean(0)  # [R,T]
        csum = torch.cat([torch.zeros_like(attn[:, :1]), torch.cumsum(attn, dim=1)], dim=1)
        lo = (t - w + 1).clamp(min=0)
        mid = t + 1
        hi = (t + w + 1).clamp(max=seq_len)
        past_rows = csum.index_select(1, mid) - csum.index_select(1, lo)
        future_rows = csum.index_select(1, hi) - csum.index_select(1, mid)
        probe_ok = (rows[:, None] >= (t + w)[None, :]).to(attn.dtype)
        past = (past_rows * probe_ok).sum(0)
        future = (future_rows * probe_ok).sum(0)
        ratio = (torch.maximum(past, future) + 1e-6) / (torch.minimum(past, future) + 1e-6)
        valid = (t >= 2 * w - 1) & (t < seq_len - 2 * w)
        ratio = torch.where(valid, ratio, torch.zeros_like(ratio))
        r = p.nms_radius
        window_max = nn.functional.max_pool1d(ratio[None, None], 2 * r + 1, stride=1,
                                              padding=r)[0, 0]
        peaks = (ratio >= p.boundary_threshold) & (ratio >= window_max)
        # boundary after c -> chunk starts at c+1; token 0 and the dense tail start chunks
        starts = torch.cat([torch.ones(1, dtype=torch.bool), peaks[:-1]])
        if p.dense_tail:
            starts = starts | (t == seq_len - p.dense_tail)
        grid = (t % fixed_chunk.clamp(min=1)) == 0
        use_grid = fixed_chunk > 0  # (no Where on booleans: ORT lacks that kernel)
        return (use_grid & grid) | (~use_grid & starts)

    # -- selection ----------------------------------------------------------------------
    def token_scores(self, q, k, starts):
        p = self.p
        seq_len = q.shape[1]
        bs = p.block_size
        q_bar, k_bar = q.mean(0), k.mean(0)  # [T,D]
        ids = torch.cumsum(starts.to(torch.int64), dim=0) - 1
        sums = torch.zeros_like(k_bar).scatter_add(0, ids[:, None].expand(seq_len, self.d), k_bar)
        lengths = torch.zeros_like(k_bar[:, 0]).scatter_add(0, ids, torch.ones_like(k_bar[:, 0]))
        chunk_vec = sums / lengths.clamp(min=1.0).sqrt()[:, None]
        nb = (seq_len + bs - 1) // bs
        padded = nn.functional.pad(q_bar, (0, 0, 0, nb * bs - seq_len))
        block_len = (seq_len - torch.arange(nb) * bs).clamp(max=bs).to(q.dtype)
        block_vec = padded.view(nb, bs, self.d).sum(1) / block_len.sqrt()[:, None]
        return torch.matmul(block_vec, chunk_vec.t()).index_select(1, ids)  # [nb,T]

    def select(self, scores, seq_len):
        p = self.p
        nb = scores.shape[0]
        t = torch.arange(seq_len)[None, :]
        block_end = ((torch.arange(nb)[:, None] + 1) * p.block_size).clamp(max=seq_len)
        allowed = t < block_end
        forced = allowed & ((t < p.sink) | (t >= block_end - p.local))
        ranked = torch.where(forced, torch.full_like(scores, float("inf")),
                             torch.where(allowed, scores, torch.full_like(scores, NEG_INF)))
        values, index = torch.topk(ranked, p.budget, dim=1)
        return index, values > NEG_INF

    # -- attention ----------------------------------------------------------------------
    def sparse(self, q, k, v, index, valid):
        p = self.p
        seq_len = q.shape[1]
        bs, g, d = p.block_size, self.group, self.d
        nb, budget = index.shape
        k_sel = k[:, index]  # [Hkv,nb,budget,D]
        v_sel = v[:, index]
        qp = nn.functional.pad(q, (0, 0, 0, nb * bs - seq_len))  # [Hq,nb*bs,D]
        qp = qp.view(self.hkv, g, nb, bs, d).permute(0, 2, 1, 3, 4).reshape(self.hkv, nb,
                                                                            g * bs, d)
        scores = torch.matmul(qp, k_sel.transpose(2, 3)) / math.sqrt(d)  # [Hkv,nb,g*bs,bud]
        qpos = (torch.arange(nb)[:, None] * bs + torch.arange(bs)[None, :]).repeat(1, g)
        ok = valid[:, None, :] & (index[:, None, :] <= qpos[:, :, None])  # [nb,g*bs,bud]
        scores = scores.masked_fill(~ok[None], NEG_INF)
        out = torch.matmul(torch.softmax(scores, dim=-1), v_sel)  # [Hkv,nb,g*bs,D]
        out = out.view(self.hkv, nb, g, bs, d).permute(0, 2, 1, 3, 4).reshape(self.h,
                                                                              nb * bs, d)
        out = out[:, :seq_len]
        if p.dense_tail:
            tail = p.dense_tail
            qt = q[:, seq_len - tail:]
            s = torch.matmul(qt, _repeat(k, g).transpose(1, 2)) / math.sqrt(d)  # [Hq,tail,T]
            pos = torch.arange(seq_len - tail, seq_len)
            s = s.masked_fill(torch.arange(seq_len)[None, None, :] > pos[None, :, None],
                              NEG_INF)
            dense = torch.matmul(torch.softmax(s, dim=-1), _repeat(v, g))
            out = torch.cat([out[:, :seq_len - tail], dense], dim=1)
        return out  # [Hq,T,D]

    def dense(self, q, k, v):
        seq_len = q.shape[1]
        s = torch.matmul(q, _repeat(k, self.group).transpose(1, 2)) / math.sqrt(self.d)
        causal = torch.arange(seq_len)[None, :] > torch.arange(seq_len)[:, None]
        s = s.masked_fill(causal[None], NEG_INF)
        return torch.matmul(torch.softmax(s, dim=-1), _repeat(v, self.group))

    def forward(self, query, key, value, past_k, past_v, ctx):
        seq_len = query.shape[1]
        q = query.view(seq_len, self.h, self.d).transpose(0, 1)  # [Hq,T,D]
        k = key.view(seq_len, self.hkv, self.d).transpose(0, 1)
        v = value.view(seq_len, self.hkv, self.d).transpose(0, 1)
        if self.layer_index < self.p.boundary_layer:
            out = self.dense(q, k, v)
        else:
            if ctx["starts"] is None:
                ctx["starts"] = self.chunk_starts(q, k, ctx["fixed_chunk"])
            index, valid = self.select(self.token_scores(q, k, ctx["starts"]), seq_len)
            out = self.sparse(q, k, v, index, valid)
        out = out.transpose(0, 1).reshape(1, seq_len, self.h * self.d)
        return out, k[None], v[None]


def dhsa_context(tree_mask, past_k0, extra):
    (fixed_chunk,) = extra
    return {"fixed_chunk": fixed_chunk, "starts": None}
