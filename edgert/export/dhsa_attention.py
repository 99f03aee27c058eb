"""DHSA prefill attention core in export-friendly torch (standard ONNX ops: CumSum,
NonZero, MaxPool, TopK, Gather, MatMul, Softmax, ScatterElements, plus com.microsoft
MultiHeadAttention). Mirrors ``edgert.dhsa.reference`` step for step; exported as
``model.dhsa.onnx``. One call of the graph is one prefill call of the reference
(``prefill_calls``): ``q`` new tokens at [P, E) against the P cached ones, E = P + q. The
cache buffers come in as inputs (read only), so a long prompt is prefilled in query chunks and
the peak memory is sized by the chunk. Every layer's core is one subgraph under
``/layers.i/self_attn/core`` so a TVM pass can find it and lower it into one fused kernel.

    boundary layer: probe attention -> mass ratios -> NMS (MaxPool) -> chunk starts of the q
                    new tokens (shared by all layers; the earlier ones come in as an input)
    every layer:    block vectors [S,nb,D] . every cached key (one MatMul over the cache;
                    with ``center_keys`` less its mean over [0, E)) -> CumSum over
                    [0, E) -> each token's chunk score, a difference of two prefix
                    sums / sqrt(len) (Gather by chunk bounds) -> token scores
                    [S,nb,E]; then attention (below). S selecting heads: 1 (all heads
                    averaged) or, with ``per_kv_head``, one per KV head

Attention, when ``local >= block_size`` (the defaults): the local window then contains the
block itself, so a block attends to its own keys (causally) plus ``budget - block_size`` keys
strictly before it::

    every block: TopK(budget - bs) of its earlier keys (sink/local forced; the last, maybe
        partial, block: budget - its length), [earlier | own] = budget keys
    per KV head: Gather its keys/values at those indices straight from the cache (flattened
        to [Hkv*C,D], a view) as [blocks,1,budget,D] -> com.microsoft MultiHeadAttention,
        batch = block, its g query heads folded into rows (BNSH keys: read in place, no
        transposed copy; the probabilities are one KV head's; in the wider early layers
        one MultiHeadAttention per query head, so they are one query head's). The bias is
        causal over the own keys, and hides the earlier slots past the block's start (a
        block near the start of the prompt has fewer earlier keys than slots: it attends to
        all of them, i.e. densely). It depends on positions and the budget only, so it is
        built once per call and budget and shared by the layers and heads.
    the prompt's last dense_tail queries (the instruction, in the last call): the same, over
        the keys [0, E); other calls have no tail rows (zero-length inputs, one key gathered)

Otherwise (``local < block_size``, whole prompt in one call only) the general form:
TopK(budget) over all allowed keys -> Gather K/V [Hkv,nb,budget,D] -> MatMul / causal mask
(Where) / Softmax / MatMul per block. Both select the same keys as
``edgert.dhsa.reference.select_keys``. A call may have fewer keys than the slots (E < budget
- block_size: the first calls with a ``prefill_chunk`` below the budget): its blocks then
attend to all their earlier keys, densely. (The runtime sends DHSA no prompt within the
budget.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgert.dhsa.params import BOUNDARY_EPS, DHSAParams
from edgert.export.attention_core import AttentionCore
from edgert.model.config import DecoderConfig

NEG_INF = float("-inf")


def _repeat(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.repeat_interleave(group, dim=0) if group > 1 else x


def causal_bias(rows, cols) -> torch.Tensor:
    """[1,1,rows,cols] additive bias: the rows are the last ``rows`` of ``cols`` positions,
    each sees the keys up to its own position."""
    query_pos = torch.arange(rows)[:, None] + (cols - rows)
    bias = torch.where(torch.arange(cols)[None, :] > query_pos, torch.tensor(NEG_INF),
                       torch.tensor(0.0))
    return bias[None, None]


def earlier_slots_bias(block_start: torch.Tensor, own_start: torch.Tensor, rows: int,
                       cols: int) -> torch.Tensor:
    """[n,1,rows,cols] bias of blocks whose ``cols`` keys are [earlier | own], the own ones
    from slot ``own_start`` [n,1]: query row r sees the own keys up to slot own_start + r
    (causal), and an earlier slot only if it is one of the block's ``block_start`` [n,1]
    earlier keys (TopK ranks the real ones first). Rows past the block's length (padding of
    a partial last block) see all its keys."""
    slot = torch.arange(cols)[None, :]
    hidden = (slot < own_start) & (slot >= block_start)  # [n,cols]
    future = slot[None] > own_start[:, :, None] + torch.arange(rows)[None, :, None]
    masked = future | hidden[:, None, :]  # [n,rows,cols]
    return torch.where(masked, torch.tensor(NEG_INF), torch.tensor(0.0))[:, None]


def rows_from(first_position, past_len, q_len):
    """The call's local row of prompt position ``first_position``, clamped to [0, q]."""
    return torch.clamp(first_position - past_len, min=0, max=q_len)


class _BlockMHA(torch.autograd.Function):
    """Each block's queries over its gathered keys with an additive bias. Eager: the math
    (tracing, tests). Export: one com.microsoft MultiHeadAttention node (ONNX Runtime's CPU
    kernel fuses scores, bias, softmax and the value product, parallel over blocks x heads).

    query [n,S,H*D], key/value [n,H,L,D] (BNSH: the kernel reads them as they are, no
    transposed copy), bias [1 or n,1,S,L] -> [n,S,H*D]
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, num_heads, head_dim):
        n, s, _ = query.shape
        q = query.view(n, s, num_heads, head_dim).transpose(1, 2)
        scores = torch.matmul(q, key.transpose(2, 3)) / math.sqrt(head_dim) + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), value)
        return out.transpose(1, 2).reshape(n, s, num_heads * head_dim)

    @staticmethod
    def symbolic(g, query, key, value, bias, num_heads, head_dim):
        # attention_bias is input 5; fix_contrib_optional_inputs() moves it there after export
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, bias,
                   num_heads_i=num_heads)
        out.setType(query.type())
        return out


class DHSACore(AttentionCore):
    def __init__(self, config: DecoderConfig, layer_index: int = 0,
                 dhsa: DHSAParams | None = None) -> None:
        super().__init__(config, layer_index)
        base = dhsa or DHSAParams()
        self.p = base.for_layer(layer_index)  # its own budget
        # a wider layer attends one query head at a time: its probabilities and bias are no
        # larger than a base layer's with its g heads folded in
        self.split_heads = self.p.budget > base.budget

    # -- boundaries ---------------------------------------------------------------------
    def chunk_starts(self, q, k, past_len, prompt_len, fixed_chunk):
        """Chunk starts [q] of this call's tokens: q [Hq,q,D] new queries, k [Hkv,E,D]."""
        p = self.p
        q_len, total = q.shape[1], k.shape[1]
        w, stride = p.boundary_window, p.probe_stride
        pos = torch.arange(q_len) + past_len  # the new tokens' positions
        t = torch.arange(total)
        # probes: every stride-th position, and the prompt's last max(dense_tail, 1) ones
        # (in the last call only)
        first = torch.remainder(torch.tensor(stride - 1) - past_len, stride)  # P: dynamic
        tail_from = rows_from(prompt_len - max(p.dense_tail, 1), past_len, q_len)
        rows = torch.cat([torch.arange(first, torch.maximum(tail_from, first), stride),
                          torch.arange(tail_from, q_len)])
        row_pos = pos.index_select(0, rows)
        attn = self.probe_attention(q.index_select(1, rows), k, t[None, :] > row_pos[:, None])
        csum = torch.cat([torch.zeros_like(attn[:, :1]), torch.cumsum(attn, dim=1)], dim=1)
        c = pos - 1  # candidate: a boundary after c starts a chunk at c + 1 = pos
        lo = (c - w + 1).clamp(min=0)
        hi = (c + w + 1).clamp(max=total)
        past_rows = csum.index_select(1, pos) - csum.index_select(1, lo)
        future_rows = csum.index_select(1, hi) - csum.index_select(1, pos)
        probe_ok = (row_pos[:, None] >= (c + w)[None, :]).to(attn.dtype)
        past = (past_rows * probe_ok).sum(0)
        future = (future_rows * probe_ok).sum(0)
        ratio = ((torch.maximum(past, future) + BOUNDARY_EPS)
                 / (torch.minimum(past, future) + BOUNDARY_EPS))
        valid = (c >= 2 * w - 1) & (c < total - 2 * w)
        ratio = torch.where(valid, ratio, torch.zeros_like(ratio))
        r = p.nms_radius
        window_max = nn.functional.max_pool1d(ratio[None, None], 2 * r + 1, stride=1,
                                              padding=r)[0, 0]
        starts = (ratio >= p.boundary_threshold) & (ratio >= window_max)
        starts = starts | (pos == 0)
        if p.dense_tail:
            starts = starts | (pos == prompt_len - p.dense_tail)  # the instruction
        grid = (pos % fixed_chunk.clamp(min=1)) == 0
        use_grid = fixed_chunk > 0  # (no Where on booleans: ORT lacks that kernel)
        return (use_grid & grid) | (~use_grid & starts)

    def probe_attention(self, probes, k, future):
        """Causal attention of the probe queries [Hq,R,D] over k [Hkv,E,D], averaged over the
        heads -> [R,E]; ``future`` [R,E] masks the keys after each probe. One KV head at a
        time (its g query heads against its keys): no copy of K per query head, and the
        scores are [g,R,E], not [Hq,R,E]."""
        g = self.group
        heads = probes.view(self.hkv, g, probes.shape[1], self.d)
        total = None
        for h in range(self.hkv):
            scores = torch.matmul(heads[h], k[h].transpose(0, 1)) / math.sqrt(self.d)
            attn = torch.softmax(scores.masked_fill(future[None], NEG_INF), dim=-1).sum(0)
            total = attn if total is None else total + attn
        return total / self.h

    # -- selection ----------------------------------------------------------------------
    def selecting_queries(self, q):
        """The queries that select keys, q [Hq,q,D] -> [S,q,D]: per KV head (its query heads
        averaged, S = Hkv) or all heads averaged (S = 1)."""
        if self.p.per_kv_head:
            return q.view(self.hkv, self.group, q.shape[1], self.d).mean(1)
        return q.mean(0, keepdim=True)

    def key_scores(self, block_vec, present_k, total):
        """Every cached key's dot product with every query block vector, averaged over the
        heads that share a selection: block_vec [S,nb,D], present_k [1,Hkv,C,D] ->
        [S,E,nb]. A MatMul straight over the cache buffer (the keys are the A operand, read
        in place), then a slice of the small result to the call's E keys. With
        ``center_keys`` the keys are centred on their mean over the E keys, which for a
        dot product is the per-key score minus its mean."""
        if self.p.per_kv_head:  # [Hkv,C,D] @ [Hkv,D,nb]
            raw = torch.matmul(present_k[0], block_vec.transpose(1, 2))
        else:  # [Hkv*C,D] @ [D,nb], heads averaged after the product (linear)
            nb, capacity = block_vec.shape[1], present_k.shape[2]
            raw = torch.matmul(present_k.reshape(-1, self.d), block_vec[0].transpose(0, 1))
            raw = raw.view(self.hkv, capacity, nb).mean(0, keepdim=True)
        per_key = raw[:, :total]
        if self.p.center_keys:  # block_vec . (k - mean k): the mean score over the E keys
            per_key = per_key - per_key.mean(1, keepdim=True)
        return per_key

    def token_scores(self, q_bar, present_k, starts):
        """q_bar [S,q,D] this call's selecting queries, present_k [1,Hkv,C,D] the cache,
        starts [E] -> [S,nb,E]: each key token scored by its chunk, block_vec . chunk_vec.

        chunk_vec = sum of the chunk's keys / sqrt(len) and the dot product is linear, so a
        chunk's score is a difference of prefix sums of the per-key scores,
        (cs[end] - cs[start]) / sqrt(end - start), with cs the cumulative sum (in float64:
        8K terms) over the keys. No chunk sums are scattered and no mean of the cached keys
        is taken: the work per call is one MatMul over the cache and a CumSum of [E,nb]."""
        p = self.p
        s, q_len, _ = q_bar.shape
        total = starts.shape[0]
        bs = p.block_size
        nb = (q_len + bs - 1) // bs
        padded = nn.functional.pad(q_bar, (0, 0, 0, nb * bs - q_len))
        block_len = (q_len - torch.arange(nb) * bs).clamp(max=bs).to(q_bar.dtype)
        block_vec = padded.view(s, nb, bs, self.d).sum(2) / block_len.sqrt()[None, :, None]
        per_key = self.key_scores(block_vec, present_k, total).to(torch.float64)
        prefix = torch.cat([torch.zeros_like(per_key[:, :1]), torch.cumsum(per_key, dim=1)],
                           dim=1)  # [S,E+1,nb]
        ids = torch.cumsum(starts.to(torch.int64), dim=0) - 1
        chunk_first = torch.nonzero(starts)[:, 0]  # [n_chunks]
        count = torch.ones_like(ids).sum(0, keepdim=True)  # [E], traced as a shape
        bounds = torch.cat([chunk_first, count])
        first, end = bounds.index_select(0, ids), bounds.index_select(0, ids + 1)  # [E]
        chunk_sum = prefix.index_select(1, end) - prefix.index_select(1, first)  # [S,E,nb]
        scores = chunk_sum / (end - first).to(torch.float64).sqrt()[None, :, None]
        return scores.to(q_bar.dtype).transpose(1, 2)

    def select(self, scores, seq_len):
        p = self.p
        nb = scores.shape[1]
        t = torch.arange(seq_len)[None, :]
        block_end = ((torch.arange(nb)[:, None] + 1) * p.block_size).clamp(max=seq_len)
        allowed = t < block_end
        forced = allowed & ((t < p.sink) | (t >= block_end - p.local))
        ranked = torch.where(forced, torch.full_like(scores, float("inf")),
                             torch.where(allowed, scores, torch.full_like(scores, NEG_INF)))
        values, index = torch.topk(ranked, p.budget, dim=-1)
        return index, values > NEG_INF  # [S,nb,budget]

    def select_earlier(self, scores, block_start, block_end, slots):
        """Top ``slots`` keys strictly before each block (sink and local window forced):
        scores [S,n,E], block_start/block_end [n,1] -> index [S,n,slots]; the real keys rank
        first, the slots past ``block_start`` of them are hidden by the bias. A call with
        fewer keys than slots (E < slots, early in the prompt) ranks ``slots`` -inf columns
        after its keys; their indices are clamped into [0, E) and hidden by the bias too."""
        p = self.p
        total = scores.shape[-1]
        t = torch.arange(total)[None, :]
        earlier = t < block_start
        forced = earlier & ((t < p.sink) | (t >= block_end - p.local))
        ranked = torch.where(forced, torch.full_like(scores, float("inf")),
                             torch.where(earlier, scores, torch.full_like(scores, NEG_INF)))
        filler = torch.full((scores.shape[0], scores.shape[1], slots), NEG_INF)
        ranked = torch.cat([ranked, filler], dim=-1)
        return torch.topk(ranked, slots, dim=-1).indices.clamp(max=total - 1)

    def _fold(self, query):
        """GQA as multi-head attention over the KV heads: [n,S,Hq*D] -> [n,S*g,Hkv*D], the g
        query heads sharing a KV head become g rows of that head (row s*g + j)."""
        n, s, _ = query.shape
        x = query.view(n, s, self.hkv, self.group, self.d).transpose(2, 3)
        return x.reshape(n, s * self.group, self.hkv * self.d)

    def _unfold(self, out, rows):
        """[n,S*g,Hkv*D] -> [n,S,Hq*D] (inverse of ``_fold``; S given, it may be 0)."""
        n = out.shape[0]
        x = out.view(n, rows, self.group, self.hkv, self.d).transpose(2, 3)
        return x.reshape(n, rows, self.h * self.d)

    def _fold_bias(self, bias):
        """A bias over query rows [.., S, L] -> over folded rows [.., S*g, L]."""
        b, _, s, length = bias.shape
        return bias[:, :, :, None, :].expand(b, 1, s, self.group, length).reshape(
            b, 1, s * self.group, length)

    def _attend(self, query, keys, values, folded_bias):
        """query [n,S,Hq*D] over keys/values [n,Hkv,L,D] (GQA, no KV head copies)."""
        out = _BlockMHA.apply(self._fold(query), keys, values, folded_bias, self.hkv, self.d)
        return self._unfold(out, query.shape[1])

    @staticmethod
    def gather_head(flat, capacity, index, head):
        """KV head ``head``'s entries at ``index`` [S,n,L] (its own row of it with per-KV-head
        selection, S = Hkv; else the shared one) from a cache flattened to [Hkv*C,D]:
        [n,1,L,D], BNSH with one head, as MultiHeadAttention takes keys."""
        own = index[head if index.shape[0] > 1 else 0]
        return flat[own + head * capacity][:, None]

    def _block_attention(self, block_q, present_k, present_v, index, bias, split=False):
        """Blocks of queries over the keys ``index`` [S,n,L] of the cache [1,Hkv,C,D]:
        block_q [n,R,Hq*D] -> [n,R,Hq*D]. One MultiHeadAttention per KV head, its g query
        heads folded into rows (``bias`` folded: [.,1,g*R,L]): each gathers only its own keys
        straight from the cache, and its attention probabilities are [n,1,g*R,L], a third of
        all heads' at once. ``split``: one per query head instead (``bias`` [.,1,R,L]), over
        its KV head's gathered keys: probabilities [n,1,R,L]."""
        n, rows, _ = block_q.shape
        g, d, capacity = self.group, self.d, present_k.shape[2]
        flat_k = present_k.reshape(-1, d)
        flat_v = present_v.reshape(-1, d)
        heads_q = block_q.view(n, rows, self.hkv, g * d)
        outs = []
        for h in range(self.hkv):
            keys = self.gather_head(flat_k, capacity, index, h)
            values = self.gather_head(flat_v, capacity, index, h)
            if split:
                each = [_BlockMHA.apply(heads_q[:, :, h, j * d:(j + 1) * d], keys, values,
                                        bias, 1, d) for j in range(g)]
                outs.append(torch.stack(each, dim=2))  # [n,R,g,D]
            else:
                query = heads_q[:, :, h].reshape(n, rows * g, d)
                out = _BlockMHA.apply(query, keys, values, bias, 1, d)
                outs.append(out.view(n, rows, g, d))
        return torch.stack(outs, dim=2).reshape(n, rows, self.h * d)  # heads h*g + j

    def sparse_blocks(self, scores, query, present_k, present_v, past_len, prompt_len, ctx):
        """The ``local >= block_size`` form (module docstring), dense tail included; same
        keys as ``select``. query [1,q,Hq*D] this call's queries, present_k/v [1,Hkv,C,D] the
        cache (valid over [0, E)); returns [q,Hq*D]."""
        p = self.p
        q_len, total = query.shape[1], scores.shape[2]
        bs, hq, d = p.block_size, self.h, self.d
        nb = scores.shape[1]
        full = nb - 1  # the blocks before the last one
        last = full * bs
        own_len = q_len - last  # the last block's length (a partial block has more room)
        tokens_q = nn.functional.pad(query[0], (0, 0, 0, nb * bs - q_len))  # whole blocks
        block_start = past_len + torch.arange(nb)[:, None] * bs  # [nb,1]
        # every block has budget keys: [earlier | own]; own_len of them own in the last
        own_start = p.budget - (block_start + bs).clamp(max=total) + block_start
        bias_key = ("block_bias", p.budget)  # positions and budget only: built once per
        if bias_key not in ctx:                # budget, shared by the layers
            bias = earlier_slots_bias(block_start, own_start, bs, p.budget)
            ctx[bias_key] = bias if self.split_heads else self._fold_bias(bias)
        earlier = self.select_earlier(scores[:, :full], block_start[:full],
                                      block_start[:full] + bs, p.budget - bs)
        own = (block_start[:full] + torch.arange(bs)[None, :])[None].expand(
            earlier.shape[0], full, bs)
        last_start = block_start[full:]
        last_earlier = self.select_earlier(scores[:, full:], last_start, last_start + own_len,
                                           p.budget - own_len)
        last_own = torch.arange(total)[past_len + last:][None, None, :].expand(
            last_earlier.shape[0], 1, own_len)
        index = torch.cat([torch.cat([earlier, own], 2),
                           torch.cat([last_earlier, last_own], 2)], dim=1)  # [S,nb,budget]
        out = self._block_attention(tokens_q.view(nb, bs, hq * d), present_k, present_v,
                                    index, ctx[bias_key], self.split_heads
                                    ).reshape(nb * bs, hq * d)[:q_len]
        if p.dense_tail:  # the prompt's tail: the last rows of the last call, dense
            tail_from = rows_from(prompt_len - p.dense_tail, past_len, q_len)  # q: none
            # keys [0, E) for the tail rows; one key when the call has none (no copy of the
            # prefix in every call)
            keys = torch.arange(torch.where(tail_from < q_len, total, 1))[None, None]
            if "tail_bias" not in ctx:
                ctx["tail_bias"] = self._fold_bias(causal_bias(q_len - tail_from,
                                                               keys.shape[2]))
            dense = self._block_attention(tokens_q[None, tail_from:q_len], present_k,
                                          present_v, keys, ctx["tail_bias"])[0]
            out = torch.cat([out[:tail_from], dense], dim=0)
        return out

    # -- attention, general form (one call over the whole prompt) -------------------------
    def sparse(self, q, k, v, index, valid):
        p = self.p
        seq_len, total = q.shape[1], k.shape[1]
        bs, g, d = p.block_size, self.group, self.d
        _, nb, budget = index.shape
        flat_k, flat_v = k.reshape(-1, d), v.reshape(-1, d)
        k_sel = torch.cat([self.gather_head(flat_k, total, index, h)
                           for h in range(self.hkv)], 1).transpose(0, 1)  # [Hkv,nb,bud,D]
        v_sel = torch.cat([self.gather_head(flat_v, total, index, h)
                           for h in range(self.hkv)], 1).transpose(0, 1)
        qp = nn.functional.pad(q, (0, 0, 0, nb * bs - seq_len))  # [Hq,nb*bs,D]
        qp = qp.view(self.hkv, g, nb, bs, d).permute(0, 2, 1, 3, 4).reshape(self.hkv, nb,
                                                                            g * bs, d)
        scores = torch.matmul(qp, k_sel.transpose(2, 3)) / math.sqrt(d)  # [Hkv,nb,g*bs,bud]
        qpos = (torch.arange(nb)[:, None] * bs + torch.arange(bs)[None, :]).repeat(1, g)
        ok = valid[:, :, None, :] & (index[:, :, None, :] <= qpos[None, :, :, None])
        scores = scores.masked_fill(~ok, NEG_INF)  # ok [S,nb,g*bs,bud]
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

    def dense(self, query, k, v):
        """This call's queries over all keys [Hkv,E,D], causal: [q,Hq*D]."""
        q_len, total = query.shape[1], k.shape[1]
        return self._attend(query, k[None], v[None],
                            self._fold_bias(causal_bias(q_len, total)))[0]

    @staticmethod
    def presents(past_k, past_v, k_new, v_new, past_len):
        """The cache buffers with the new K/V [Hkv,q,D] at [P, P+q) (ScatterElements): the
        runtime binds each present to its past buffer, so the write is in place and no K/V
        leaves the graph."""
        index = (torch.arange(k_new.shape[1]) + past_len)[None, None, :, None].expand(
            1, k_new.shape[0], k_new.shape[1], k_new.shape[2])
        return past_k.scatter(2, index, k_new[None]), past_v.scatter(2, index, v_new[None])

    def forward(self, query, key, value, past_k, past_v, ctx):
        q_len = query.shape[1]
        past_len = ctx["past_starts"].shape[0]
        total = past_len + q_len
        k_new = key.view(q_len, self.hkv, self.d).transpose(0, 1)  # [Hkv,q,D]
        v_new = value.view(q_len, self.hkv, self.d).transpose(0, 1)
        # the new K/V go into the cache first; the call then reads its keys [0, E) from it
        present_k, present_v = self.presents(past_k, past_v, k_new, v_new, past_len)

        def prefix(x):  # [Hkv,E,D]: a copy; the sparse blocks gather from the cache instead
            return x[:, :, :total].squeeze(0)

        if self.layer_index < self.p.boundary_layer:
            if ctx["starts"] is None:  # (no chunks when every layer is dense)
                ctx["starts"] = torch.zeros(q_len, dtype=torch.bool)
            return self.dense(query, prefix(present_k), prefix(present_v))[None], present_k, \
                present_v
        q = query.view(q_len, self.h, self.d).transpose(0, 1)  # [Hq,q,D]
        if self.layer_index == self.p.boundary_layer:
            ctx["starts"] = self.chunk_starts(q, prefix(present_k), past_len, ctx["prompt_len"],
                                              ctx["fixed_chunk"])
        scores = self.token_scores(self.selecting_queries(q), present_k,
                                   torch.cat([ctx["past_starts"], ctx["starts"]]))
        if self.p.local >= self.p.block_size:
            out = self.sparse_blocks(scores, query, present_k, present_v, past_len,
                                     ctx["prompt_len"], ctx)
            return out[None], present_k, present_v
        index, valid = self.select(scores, q_len)  # general form: P = 0
        k, v = prefix(present_k), prefix(present_v)
        out = self.with_dense_tail(self.sparse(q, k, v, index, valid), q, k, v)
        out = out.transpose(0, 1).reshape(1, q_len, self.h * self.d)
        return out, present_k, present_v


def dhsa_context(tree_mask, past_k0, extra):
    fixed_chunk, prompt_len, past_starts = extra
    return {"fixed_chunk": fixed_chunk, "prompt_len": prompt_len, "past_starts": past_starts,
            "starts": None}
