"""Matmul against a block-quantized weight, dequantized inside the kernel (CPU and GPU).

The weight stays 4- or 8-bit in memory: a decode step streams a quarter (8 bits) or an eighth
(4 bits) of the fp32 bytes. One weight column n of K values is stored as blocks of ``block``
values, each with a float scale and bias::

    W[k, n] = scale[n, b] * q[n, k] + bias[n, b]        b = k // block,  q in [0, 2^bits)

(MatMulNBits' ``scale * (q - zero_point)`` is bias = -scale * zero_point; GGUF's Q4_1
``d * q + m`` is scale = d, bias = m.) The kernel sums each block in the quantized domain and
applies the block's scale and bias once::

    out[r, n] = sum_b ( scale[n, b] * sum_{k in b} x[r, k] q[n, k]
                        + bias[n, b] * sum_{k in b} x[r, k] )

Storage (:class:`QuantizedWeight`, row form; :func:`pack_quantized` makes the kernel's):

    words  [N / bn, K / per_word, bn]  int32   per_word = 32 / bits values of one column, the
                                               value k = per_word * w + j in bits j*bits.. of
                                               word w (MatMulNBits' B, read as little-endian
                                               32-bit words, is this with bn = 1)
    scale  [N / bn, K / block, bn]     float32
    bias   [N / bn, K / block, bn]     float32

Column panels of ``bn`` as in ``tir.matmul``: a CPU task walks ``streams`` panels side by
side for ``mb`` rows at a time (the same :class:`MatmulKnobs`, tuned per shape); a word
vector of bn columns unpacks with a shift and a mask per value, no shuffles. GPU: a thread
per output column (threads of a block read neighbouring words), a block per panel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgert.passes.tir.matmul import (
    MatmulKnobs,
    clamped_row,
    panel_accumulators,
    panel_loop,
)

BITS = (4, 8)
GPU_PANEL = 32  # columns per GPU thread block (a warp)
DEFAULT = MatmulKnobs(bn=16, mb=1, streams=1)
# block and row accumulators are held together: half the packed matmul's budget
MAX_ACCUMULATORS = 64
SEARCH_SPACE = [MatmulKnobs(bn, mb, streams) for bn in (8, 16, 32, 64) for mb in (1, 2, 4)
                for streams in (1, 2, 4, 8) if bn * mb * streams <= MAX_ACCUMULATORS]


def per_word(bits: int) -> int:
    return 32 // bits


@dataclass(frozen=True)
class QuantizedWeight:
    """A [K, N] weight in row form: ``words [N, K / per_word]``, ``scale`` and ``bias``
    [N, K / block] (see the module docstring)."""

    bits: int
    block: int
    words: np.ndarray  # int32
    scale: np.ndarray  # float32
    bias: np.ndarray  # float32

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {self.bits}")
        if self.block % per_word(self.bits):
            raise ValueError(f"block {self.block} is not a whole number of {self.bits}-bit words")

    @property
    def k(self) -> int:
        return self.words.shape[1] * per_word(self.bits)

    @property
    def n(self) -> int:
        return self.words.shape[0]

    def values(self) -> np.ndarray:
        """q [N, K] (uint8)."""
        shifts = np.arange(per_word(self.bits), dtype=np.uint32) * self.bits
        unpacked = (self.words.view(np.uint32)[:, :, None] >> shifts) & ((1 << self.bits) - 1)
        return unpacked.reshape(self.n, self.k).astype(np.uint8)

    def dequantize(self) -> np.ndarray:
        """W [K, N] float32."""
        q = self.values().reshape(self.n, -1, self.block).astype(np.float32)
        w = q * self.scale[:, :, None] + self.bias[:, :, None]
        return np.ascontiguousarray(w.reshape(self.n, self.k).T)

    @classmethod
    def from_matmul_nbits(cls, b: np.ndarray, scales: np.ndarray,
                          zero_points: np.ndarray | None, k: int, n: int, bits: int,
                          block: int) -> QuantizedWeight:
        """The weight of a MatMulNBits (B [N, K/block, block*bits/8] uint8, scales, zero
        points uint8-packed, float or absent); K must be a whole number of blocks."""
        if k % block:
            raise ValueError(f"K={k} is not a whole number of {block}-value blocks")
        blocks = k // block
        words = np.ascontiguousarray(b.reshape(n, -1)).view("<u4").astype(np.int32)
        scale = scales.reshape(n, blocks).astype(np.float32)
        if zero_points is None:
            zero = np.full((n, blocks), 2 ** (bits - 1), np.float32)
        elif zero_points.dtype == np.uint8:
            zero = unpack_values(zero_points.reshape(n, -1), bits, blocks).astype(np.float32)
        else:
            zero = zero_points.reshape(n, blocks).astype(np.float32)
        return cls(bits, block, words, scale, (-scale * zero).astype(np.float32))


def unpack_values(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[..., bytes] uint8 -> [..., count] values (4 bits: two a byte, low nibble first)."""
    if bits == 8:
        return packed[..., :count]
    pairs = np.stack([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :count]


def pack_quantized(weight: QuantizedWeight, bn: int) -> list[np.ndarray]:
    """[words, scale, bias] in the kernel's panel layout ([N / bn, rows, bn] each)."""
    def panels(rows: np.ndarray) -> np.ndarray:
        n, width = rows.shape
        return np.ascontiguousarray(rows.reshape(n // bn, bn, width).transpose(0, 2, 1))

    return [panels(weight.words), panels(weight.scale), panels(weight.bias)]


def quant_matmul_reference(x: np.ndarray, weight: QuantizedWeight) -> np.ndarray:
    """NumPy reference: x [.., K] @ W (float64 sums, returned as float32)."""
    return (x.astype(np.float64) @ weight.dequantize().astype(np.float64)).astype(np.float32)


def unpack(word, bits: int, j):
    """Value ``j`` of a packed int32 word, as float32 (a PrimExpr; call while parsing)."""
    from tvm.script import tirx as T

    return T.Cast("float32", T.bitwise_and(T.shift_right(word, bits * j), (1 << bits) - 1))


def quant_matmul_tir(k_dim: int, n_dim: int, bits: int, block: int = 32,
                     knobs: MatmulKnobs = DEFAULT, gpu: bool = False,
                     index_dtype: str = "int64"):
    """out [b, m, N] = x [b, m, K] @ W, W given packed (see the module docstring). GPU
    kernels use ``GPU_PANEL``-column panels and ignore ``knobs``."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, not {bits}")
    if k_dim % block or block % per_word(bits):
        raise ValueError(f"K={k_dim} is not a whole number of {block}-value blocks of "
                         f"{bits}-bit words")
    if gpu:
        knobs = MatmulKnobs(GPU_PANEL, 1, 1)
    if not knobs.fits(n_dim):
        raise ValueError(f"panel width {knobs.bn} x {knobs.streams} streams does not divide "
                         f"N={n_dim}")
    build = _gpu_kernel if gpu else _cpu_kernel
    return build(k_dim, n_dim, bits, block, knobs, index_dtype)


def _cpu_kernel(k_dim, n_dim, bits, block, knobs, index_dtype):
    from tvm.script import tirx as T

    bn, mb, streams = knobs.bn, knobs.mb, knobs.streams
    panels, blocks, values = n_dim // bn, k_dim // block, per_word(bits)
    words, words_per_block = k_dim // values, block // values
    tasks = panels // streams
    zero, store = panel_accumulators(knobs)
    row = clamped_row

    def first(vt):  # the task's first panel (a PrimExpr, built while parsing)
        return vt * streams

    @T.macro
    def body(vt, vr, b, m, x, w, scale, bias, out):
        T.reads(x[0:b, 0:m, 0:k_dim], w[first(vt):first(vt) + streams, 0:words, 0:bn],
                scale[first(vt):first(vt) + streams, 0:blocks, 0:bn],
                bias[first(vt):first(vt) + streams, 0:blocks, 0:bn])
        T.writes(out[0:b, 0:m, first(vt) * bn:(first(vt) + streams) * bn])
        acc = T.alloc_buffer((mb, streams, bn), "float32", scope="local")
        part = T.alloc_buffer((mb, streams, bn), "float32", scope="local")
        xsum = T.alloc_buffer((mb,), "float32", scope="local")
        zero(acc)
        for kb in range(blocks):
            for r in T.unroll(mb):
                xsum[r] = T.float32(0)
                for s in T.unroll(streams):
                    for c in T.vectorized(bn):
                        part[r, s, c] = T.float32(0)
            for kw in range(words_per_block):
                for j in T.unroll(values):
                    for r in T.unroll(mb):
                        xsum[r] = xsum[r] + x[row(vr * mb + r, b, m) // m,
                                              row(vr * mb + r, b, m) % m,
                                              kb * block + kw * values + j]
                        for s in T.unroll(streams):
                            for c in T.vectorized(bn):
                                part[r, s, c] = part[r, s, c] + x[
                                    row(vr * mb + r, b, m) // m, row(vr * mb + r, b, m) % m,
                                    kb * block + kw * values + j] * unpack(
                                    w[vt * streams + s, kb * words_per_block + kw, c], bits, j)
            for r in T.unroll(mb):
                for s in T.unroll(streams):
                    for c in T.vectorized(bn):
                        acc[r, s, c] = (acc[r, s, c]
                                        + part[r, s, c] * scale[vt * streams + s, kb, c]
                                        + xsum[r] * bias[vt * streams + s, kb, c])
        store(out, acc, vt, vr, b, m)

    loop = panel_loop(knobs, tasks, body)

    @T.prim_func(private=True, s_tir=True)
    def quant_matmul(var_x: T.handle, var_w: T.handle, var_scale: T.handle, var_bias: T.handle,
                     var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = T.int64()
        m = T.int64()
        x = T.match_buffer(var_x, (b, m, k_dim), "float32")
        w = T.match_buffer(var_w, (panels, words, bn), "int32")
        scale = T.match_buffer(var_scale, (panels, blocks, bn), "float32")
        bias = T.match_buffer(var_bias, (panels, blocks, bn), "float32")
        out = T.match_buffer(var_out, (b, m, n_dim), "float32")
        loop(b, m, x, w, scale, bias, out)

    return quant_matmul


def _gpu_kernel(k_dim, n_dim, bits, block, knobs, index_dtype):
    from tvm.script import tirx as T

    from edgert.passes.tir.common import index_type

    length, _ = index_type(index_dtype)
    bn = knobs.bn
    panels, blocks, values = n_dim // bn, k_dim // block, per_word(bits)
    words, words_per_block = k_dim // values, block // values

    @T.prim_func(private=True, s_tir=True)
    def quant_matmul(var_x: T.handle, var_w: T.handle, var_scale: T.handle, var_bias: T.handle,
                     var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b = length()
        m = length()
        x = T.match_buffer(var_x, (b, m, k_dim), "float32")
        w = T.match_buffer(var_w, (panels, words, bn), "int32")
        scale = T.match_buffer(var_scale, (panels, blocks, bn), "float32")
        bias = T.match_buffer(var_bias, (panels, blocks, bn), "float32")
        out = T.match_buffer(var_out, (b, m, n_dim), "float32")
        for p in T.thread_binding(panels, thread="blockIdx.x"):
            for c in T.thread_binding(bn, thread="threadIdx.x"):
                for r in range(b * m):
                    with T.sblock("column"):
                        vp = T.axis.spatial(panels, p)
                        vc = T.axis.spatial(bn, c)
                        vr = T.axis.spatial(b * m, r)
                        T.reads(x[vr // m, vr % m, 0:k_dim], w[vp, 0:words, vc],
                                scale[vp, 0:blocks, vc], bias[vp, 0:blocks, vc])
                        T.writes(out[vr // m, vr % m, vp * bn + vc])
                        acc = T.alloc_buffer((1,), "float32", scope="local")
                        part = T.alloc_buffer((1,), "float32", scope="local")
                        xsum = T.alloc_buffer((1,), "float32", scope="local")
                        acc[0] = T.float32(0)
                        for kb in range(blocks):
                            part[0] = T.float32(0)
                            xsum[0] = T.float32(0)
                            for kw in range(words_per_block):
                                for j in T.unroll(values):
                                    xsum[0] = xsum[0] + x[vr // m, vr % m,
                                                          kb * block + kw * values + j]
                                    part[0] = part[0] + x[
                                        vr // m, vr % m, kb * block + kw * values + j] * unpack(
                                        w[vp, kb * words_per_block + kw, vc], bits, j)
                            acc[0] = acc[0] + part[0] * scale[vp, kb, vc] + xsum[0] * bias[
                                vp, kb, vc]
                        out[vr // m, vr % m, vp * bn + vc] = acc[0]

    return quant_matmul


def dequantize_tir(k_dim: int, n_dim: int, bits: int, block: int = 32):
    """W [K, N] float32 of a weight in row form (words [N, K/per_word], scale and bias
    [N, K/block]): an unscheduled PrimFunc, which ``FoldConstant`` evaluates where no
    dequantizing kernel takes its place."""
    from tvm.script import tirx as T

    values = per_word(bits)
    words, blocks = k_dim // values, k_dim // block

    @T.prim_func(private=True, s_tir=True)
    def dequantize(w: T.Buffer((n_dim, words), "int32"), scale: T.Buffer((n_dim, blocks),
                   "float32"), bias: T.Buffer((n_dim, blocks), "float32"),
                   out: T.Buffer((k_dim, n_dim), "float32")):
        T.func_attr({"op_pattern": 2})  # injective: foldable, fusable
        for kk, n in T.grid(k_dim, n_dim):
            with T.sblock("dequantize"):
                vk, vn = T.axis.remap("SS", [kk, n])
                out[vk, vn] = scale[vn, vk // block] * unpack(
                    w[vn, vk // values], bits, vk % values) + bias[vn, vk // block]

    return dequantize


def quant_matmul_workload(k_dim: int, n_dim: int, bits: int) -> str:
    """The tuning-database name of the [K, N] ``bits``-bit matmul."""
    return f"quant_matmul{bits}_{k_dim}_{n_dim}"
