"""DHSA prefill attention core in export-friendly torch (standard ONNX ops: CumSum,
ScatterElements(add), MaxPool, TopK, Gather, MatMul, Softmax). Mirrors
``edgert.dhsa.reference`` step for step; exported as ``model.dhsa.onnx`` (whole prompt in one
call, no past). Every layer's core is one subgraph under ``/layers.i/self_attn/core`` so a TVM
pass can find it and lower it into one fused kernel.

    boundary layer: probe attention -> mass ratios -> NMS (MaxPool) -> chunk starts [T] (shared)
    every layer:    chunk ids = CumSum(starts)-1 -> chunk sums (ScatterElements add) / sqrt(len)
                    block vectors [nb,D] . chunk vectors -> Gather(ids) -> token scores [nb,T]
                    then attention (below); the last dense_tail queries attend densely

Attention, when ``local >= block_size`` (the defaults), split so that no per-layer mask is
built: the local window then contains the block itself, so a block attends to its own keys
(causally) plus ``budget - block_size`` keys strictly before it, which need no mask::

    blocks [0, n0), n0 = budget // block_size: every allowed key fits the budget -> dense causal
    blocks [n0, nb): TopK(budget - bs) of the earlier keys (sink/local forced) -> Gather K/V
           (token-major, KV heads repeated, with the block's own keys appended: one Gather)
        -> com.microsoft MultiHeadAttention, batch = block, with a constant bias (causal
           within the own keys; the same [bs, budget] tensor for every block and layer)
    the last block again, exactly: TopK(budget - its length) (a partial block has more room)

Otherwise (``local < block_size``) the general form: TopK(budget) over all allowed keys ->
Gather K/V [Hkv,nb,budget,D] -> MatMul / causal mask (Where) / Softmax / MatMul per block.
Both select the same keys as ``edgert.dhsa.reference.select_keys``. The first form needs
a prompt longer than ``budget`` (the runtime sends DHSA nothing shorter).
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


def causal_bias(rows: int, cols: int) -> torch.Tensor:
    """[1,1,rows,cols] additive bias: the rows are the last ``rows`` of ``cols`` positions,
    each sees the keys up to its own position."""
    query_pos = torch.arange(rows)[:, None] + (cols - rows)
    bias = torch.where(torch.arange(cols)[None, :] > query_pos, torch.full((rows, cols),
                       NEG_INF), torch.zeros(rows, cols))
    return bias[None, None]


class _BlockMHA(torch.autograd.Function):
    """Each block's queries over its gathered keys with an additive bias. Eager: the math
    (tracing, tests). Export: one com.microsoft MultiHeadAttention node (ONNX Runtime's CPU
    kernel fuses scores, bias, softmax and the value product, parallel over blocks x heads).

    query [n,S,H*D], key/value [n,L,H*D], bias [1,1,S,L] -> [n,S,H*D]
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, num_heads, head_dim):
        n, s, _ = query.shape
        length = key.shape[1]
        q = query.view(n, s, num_heads, head_dim).transpose(1, 2)
        k = key.view(n, length, num_heads, head_dim).transpose(1, 2)
        v = value.view(n, length, num_heads, head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim) + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return out.transpose(1, 2).reshape(n, s, num_heads * head_dim)

    @staticmethod
    def symbolic(g, query, key, value, bias, num_heads, head_dim):
        # attention_bias is input 5; fix_contrib_optional_inputs() moves it there after export
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, bias,
                   num_heads_i=num_heads)
        out.setType(query.type())
        return out


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

    def select_earlier(self, scores, block_start, block_end, slots):
        """Top ``slots`` keys strictly before each block (sink and local window forced):
        scores [n,T], block_start/block_end [n,1] -> index [n,slots]. Every slot is a real key
        (callers guarantee block_start >= slots)."""
        p = self.p
        t = torch.arange(scores.shape[1])[None, :]
        earlier = t < block_start
        forced = earlier & ((t < p.sink) | (t >= block_end - p.local))
        ranked = torch.where(forced, torch.full_like(scores, float("inf")),
                             torch.where(earlier, scores, torch.full_like(scores, NEG_INF)))
        return torch.topk(ranked, slots, dim=1).indices

    def _block_attention(self, tokens_q, tokens_k, tokens_v, index):
        """Blocks of queries over [their selected earlier keys | their own keys], causal
        within their own keys, the bias the same for every block and layer.

        tokens_q [T',Hq*D] (padded to whole blocks, these blocks only), tokens_k/v [T,Hq*D]
        (KV heads repeated to the query heads), index [n,P+S] (the own keys last; clamped to
        T-1 past the prompt, which the bias hides) -> [n,S,Hq*D]."""
        n, length = index.shape
        q = tokens_q.view(n, -1, self.h * self.d)
        s = q.shape[1]
        return _BlockMHA.apply(q, tokens_k[index], tokens_v[index], causal_bias(s, length),
                               self.h, self.d)

    def sparse_blocks(self, scores, query, key, value):
        """The ``local >= block_size`` form (module docstring), dense tail included; same
        keys as ``select``. Needs a prompt longer than the budget (the runtime's condition
        for DHSA). query/key/value: the core's token-major inputs [1,T,H*D]; returns
        [T,Hq*D]."""
        p = self.p
        seq_len = query.shape[1]
        bs, hq, d = p.block_size, self.h, self.d
        nb = scores.shape[0]
        n0 = p.budget // bs
        head = n0 * bs  # queries that see at most `budget` keys: dense
        tokens_q = nn.functional.pad(query[0], (0, 0, 0, nb * bs - seq_len))  # whole blocks
        tokens_k = self._heads_repeated(key, seq_len)
        tokens_v = self._heads_repeated(value, seq_len)
        out_head = _BlockMHA.apply(tokens_q[None, :head], tokens_k[None, :head],
                                   tokens_v[None, :head], causal_bias(head, head), hq, d)[0]
        blocks = torch.arange(nb)[n0:, None]
        earlier = self.select_earlier(scores[n0:], blocks * bs,
                                      ((blocks + 1) * bs).clamp(max=seq_len), p.budget - bs)
        own = (blocks * bs + torch.arange(bs)[None, :]).clamp(max=seq_len - 1)
        out_mid = self._block_attention(tokens_q[head:], tokens_k, tokens_v,
                                        torch.cat([earlier, own], dim=1))
        # the last block, exactly: a partial block has budget - its length earlier keys
        last = (nb - 1) * bs
        own_len = seq_len - last
        last_block = torch.arange(nb)[nb - 1:, None]
        last_earlier = self.select_earlier(scores[nb - 1:], last_block * bs,
                                           ((last_block + 1) * bs).clamp(max=seq_len),
                                           p.budget - own_len)
        last_own = torch.arange(seq_len)[last:][None, :]
        out_last = self._block_attention(tokens_q[last:seq_len], tokens_k, tokens_v,
                                         torch.cat([last_earlier, last_own], dim=1))
        parts = [out_head, out_mid.reshape(-1, hq * d)[:last - head],
                 out_last.reshape(-1, hq * d)]
        out = torch.cat(parts, dim=0)  # [T,Hq*D]
        if p.dense_tail:
            tail = p.dense_tail
            dense = _BlockMHA.apply(tokens_q[None, seq_len - tail:seq_len], tokens_k[None],
                                    tokens_v[None], causal_bias(tail, seq_len), hq, d)[0]
            out = torch.cat([out[:seq_len - tail], dense], dim=0)
        return out

    def _heads_repeated(self, x, seq_len):
        """[1,T,Hkv*D] -> [T,Hq*D]: each KV head repeated for its query heads (GQA)."""
        x = x.view(seq_len, self.hkv, 1, self.d).expand(seq_len, self.hkv, self.group, self.d)
        return x.reshape(seq_len, self.h * self.d)

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
        return out[:, :seq_len]

    def with_dense_tail(self, out, q, k, v):
        """The last ``dense_tail`` queries (the instruction) attend densely."""
        p = self.p
        seq_len, g, d = q.shape[1], self.group, self.d
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
            scores = self.token_scores(q, k, ctx["starts"])
            if self.p.local >= self.p.block_size:
                out = self.sparse_blocks(scores, query, key, value)[None]
                return out, k[None], v[None]
            index, valid = self.select(scores, seq_len)
            out = self.with_dense_tail(self.sparse(q, k, v, index, valid), q, k, v)
        out = out.transpose(0, 1).reshape(1, seq_len, self.h * self.d)
        return out, k[None], v[None]


def dhsa_context(tree_mask, past_k0, extra):
    (fixed_chunk,) = extra
    return {"fixed_chunk": fixed_chunk, "starts": None}
