"""Weights quantized in 32-wide blocks along the input dimension, as GGUF stores them.

A linear layer's weight ``W [N, K]`` (``y = x @ W.T``) is kept as unsigned integers
``q [N, K]`` of ``bits`` bits with, per block of 32 consecutive inputs ``b = k // 32``, a
scale and either a fixed zero point (symmetric), an integer zero point, or a minimum::

    symmetric      W[n, k] = scale[n, b] * (q[n, k] - zero)   zero = 8 (4 bits), 128 (8 bits)
    zero point     W[n, k] = scale[n, b] * (q[n, k] - zero_point[n, b])   (uint8)
    minimum        W[n, k] = scale[n, b] * q[n, k] + minimum[n, b]

GGUF's types map onto it exactly, with no requantization, and :meth:`dequantize` computes
what the ``gguf`` package does, bit for bit:

    Q4_0   w = d * (q - 8)              symmetric, 4 bits
    Q4_1   w = d * q + m                asymmetric, 4 bits (minimum m)
    Q8_0   w = d * q8      (q8 int8)    symmetric, 8 bits  (q = q8 + 128)

``scale * (q - zero)`` is what ONNX Runtime's MatMulNBits computes with its default zero
point, and an integer zero point through its ``zero_points`` input, both on its fast path; a
minimum block adds ``blocksum(x) @ (minimum + zero * scale).T`` (:meth:`BlockQuantized.
correction`; docs/artifact.md). Other GGUF types (K-quants, Q5_x, Q6_K) and fp32/fp16 sources
are quantized here by round-to-nearest (:func:`quantize_rtn`): 8 bits symmetric, 4 bits with
an integer zero point (the form onnxruntime-genai's int4 uses: no correction).

At int8 activations a minimum block runs as :class:`MinimumRows` instead: integer zero points
take the minimum's whole steps, and its remainder rides in K/32 extra 4-bit "minimum rows"
that multiply the block sums appended to the input, so one MatMulNBits computes the layer on
its fast path (the remainder is rounded to 4 bits: the one change to the weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgert.errors import ModelSourceError

BLOCK = 32
ZERO = {4: 8, 8: 128}  # MatMulNBits' default zero points


@dataclass
class BlockQuantized:
    """``W [N, K]`` as ``bits``-bit integers in 32-wide blocks (see the module docstring).

    q : uint8 [N, K], values in [0, 2**bits)
    scale : float32 [N, K/32], each value exactly representable in fp16 (GGUF stores fp16;
        so does the artifact)
    minimum : float32 [N, K/32] (asymmetric, fp16-representable), or None
    zero_point : uint8 [N, K/32] (asymmetric, integer), or None; with neither, the block is
        symmetric around ``zero``
    source : the format it came from ("Q4_1", "Q8_0", "rtn4", ...)
    """

    bits: int
    q: np.ndarray
    scale: np.ndarray
    minimum: np.ndarray | None
    source: str
    zero_point: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def zero(self) -> int:
        return ZERO[self.bits]

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], in the arithmetic of the format (GGUF's, for GGUF blocks)."""
        n, k = self.q.shape
        q = self.q.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
        if self.minimum is not None:
            w = self.scale[:, :, None] * q + self.minimum[:, :, None]
        elif self.zero_point is not None:
            w = self.scale[:, :, None] * (q - self.zero_point[:, :, None].astype(np.float32))
        else:
            w = self.scale[:, :, None] * (q - np.float32(self.zero))
        return w.reshape(n, k)

    def correction(self) -> np.ndarray | None:
        """float32 [N, K/32] ``minimum + zero * scale``: what an asymmetric block adds to
        ``scale * (q - zero)``; None when symmetric."""
        if self.minimum is None:
            return None
        return self.minimum + np.float32(self.zero) * self.scale

    def take_rows(self, rows: np.ndarray) -> BlockQuantized:
        """The same weight with its output rows reordered (``W[rows]``): blocks run along K,
        so a row permutation moves whole blocks and stays exact."""
        minimum = None if self.minimum is None else self.minimum[rows]
        zero_point = None if self.zero_point is None else self.zero_point[rows]
        return BlockQuantized(self.bits, self.q[rows], self.scale[rows], minimum, self.source,
                              zero_point)

    @property
    def form(self) -> str:
        """"symmetric", "zero_point" or "minimum": which MatMulNBits mapping it takes."""
        if self.minimum is not None:
            return "minimum"
        return "symmetric" if self.zero_point is None else "zero_point"

    @property
    def nbytes(self) -> int:
        """Bytes of the stored form: ``bits`` per weight plus fp16 scales (and minimums, or
        ``bits``-bit zero points)."""
        n, k = self.q.shape
        blocks = n * (k // BLOCK)
        extra = {"minimum": 2 * blocks, "zero_point": blocks * self.bits // 8,
                 "symmetric": 0}[self.form]
        return n * k * self.bits // 8 + 2 * blocks + extra


MINIMUM_ROWS_BITS = 4


@dataclass(frozen=True)
class MinimumRows:
    """A minimum-form weight ``W [N, K]`` as one integer-zero-point weight over the input
    widened with its block sums, ``[x, blocksum(x)]`` (``inputs`` = K + K/32 values)::

        W[n, k] = d (q - z) + r          z = clip(round(-m / d), 0, 15)   (integer)
                                         r = m + z d                      (|r| <= d/2 unless
                                                                           z was clipped)
        x @ W.T = [x, blocksum(x)] @ [d (q - z) | r'].T

    ``widened`` holds the stored blocks (q and d as they are, z as integer zero points), then
    the minimum rows: r [N, K/32] quantized to ``MINIMUM_ROWS_BITS`` bits in blocks of 32 (a
    scale and integer zero point each, round to nearest), r' its dequantized value, zero
    weights after the last. ``effective()`` is what it computes on x: W with each block's
    minimum moved by r' - r."""

    widened: BlockQuantized  # [N, 32 * (K/32 + ceil(K/32 / 32))], zero-point form
    k: int  # the weight's own input width K
    moved: np.ndarray  # [N, K/32] r' - r: how far each block's minimum moved

    def error(self) -> dict[str, float]:
        """Max and RMS change of the weight's values (each block's all move by its r' - r)."""
        return {"max": float(np.abs(self.moved).max()),
                "rms": float(np.sqrt(np.mean(self.moved * self.moved)))}

    @property
    def inputs(self) -> int:
        return self.k + self.k // BLOCK

    def remainder(self) -> np.ndarray:
        """r' [N, K/32], the minimum rows' dequantized values."""
        return self.widened.dequantize()[:, self.k:self.inputs]

    def effective(self) -> np.ndarray:
        """float32 [N, K]: the weight applied to x."""
        main = self.widened.dequantize()[:, :self.k]
        return main + np.repeat(self.remainder(), BLOCK, axis=1)


def minimum_as_rows(w: BlockQuantized) -> MinimumRows:
    """``w`` (4-bit minimum form, Q4_1) as :class:`MinimumRows`."""
    if w.minimum is None or w.bits != 4:
        raise ValueError(f"minimum rows take 4-bit minimum-form blocks, not {w.bits}-bit "
                         f"{w.form}")
    n, k = w.shape
    safe = np.where(w.scale > 0, w.scale, np.float32(1))
    zero_point = np.clip(np.rint(-w.minimum / safe), 0, 15)
    remainder = (w.minimum + zero_point * w.scale).astype(np.float32)
    width = -(-remainder.shape[1] // BLOCK) * BLOCK
    rows = quantize_rtn(np.pad(remainder, ((0, 0), (0, width - remainder.shape[1]))),
                        MINIMUM_ROWS_BITS)
    widened = BlockQuantized(
        4, np.concatenate([w.q, rows.q], axis=1), np.concatenate([w.scale, rows.scale], axis=1),
        None, w.source,
        np.concatenate([zero_point.astype(np.uint8), rows.zero_point], axis=1))
    moved = rows.dequantize()[:, :remainder.shape[1]] - remainder
    return MinimumRows(widened, k, moved)


def _blocks(raw: np.ndarray, rows: int, cols: int, block_bytes: int) -> np.ndarray:
    """Raw GGUF tensor bytes -> [rows, cols/32, block_bytes] uint8."""
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    expected = rows * (cols // BLOCK) * block_bytes
    if data.size != expected:
        raise ModelSourceError(f"GGUF tensor of {rows}x{cols} has {data.size} bytes, expected "
                               f"{expected}: the file is truncated or corrupt")
    return data.reshape(rows, cols // BLOCK, block_bytes)


def _fp16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, :, start:start + 2].copy().view(np.float16)[:, :, 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """GGML's 4-bit order: byte j holds value j (low nibble) and value j + 16 (high)."""
    low, high = packed & np.uint8(0x0F), packed >> np.uint8(4)
    rows, nb, _ = packed.shape
    return np.concatenate([low, high], axis=2).reshape(rows, nb * BLOCK)


def _q4_0(blocks: np.ndarray) -> BlockQuantized:
    d = _fp16(blocks, 0)
    return BlockQuantized(4, _nibbles(blocks[:, :, 2:]), d, None, "Q4_0")


def _q4_1(blocks: np.ndarray) -> BlockQuantized:
    d, m = _fp16(blocks, 0), _fp16(blocks, 2)
    return BlockQuantized(4, _nibbles(blocks[:, :, 4:]), d, m, "Q4_1")


def _q8_0(blocks: np.ndarray) -> BlockQuantized:
    d = _fp16(blocks, 0)
    q8 = blocks[:, :, 2:].view(np.int8).astype(np.int16) + 128
    rows, nb, _ = blocks.shape
    return BlockQuantized(8, q8.astype(np.uint8).reshape(rows, nb * BLOCK), d, None, "Q8_0")


# GGUF type name -> (bytes per 32-value block, reader)
GGUF_EXACT = {"Q4_0": (18, _q4_0), "Q4_1": (20, _q4_1), "Q8_0": (34, _q8_0)}


def from_gguf(raw: np.ndarray, type_name: str, rows: int, cols: int) -> BlockQuantized:
    """A GGUF tensor of an exactly mapped type (Q4_0, Q4_1, Q8_0), ``rows x cols`` (the
    weight's [N, K]), as stored: no requantization."""
    if type_name not in GGUF_EXACT:
        raise ModelSourceError(f"GGUF type {type_name} has no exact block form; requantize it "
                               "(quantize_rtn)")
    if cols % BLOCK:
        raise ModelSourceError(f"a {rows}x{cols} GGUF tensor is not in {BLOCK}-wide blocks")
    block_bytes, read = GGUF_EXACT[type_name]
    return read(_blocks(raw, rows, cols, block_bytes))


def quantize_rtn(weight: np.ndarray, bits: int, source: str | None = None) -> BlockQuantized:
    """Round-to-nearest ``bits``-bit quantization of ``W [N, K]`` in 32-wide blocks.

    4 bits: asymmetric with an integer zero point (scale = (max - min) / 15, zero point =
    round(-min / scale)); 8 bits: symmetric (scale = max|w| / 127, as Q8_0). Scales are
    rounded to fp16 first (how they are stored) and the integers rounded against them. K must
    be a multiple of 32.
    """
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    if k % BLOCK:
        raise ModelSourceError(f"cannot quantize a {n}x{k} weight in {BLOCK}-wide blocks: its "
                               f"input dimension {k} is not a multiple of {BLOCK}")
    blocks = weight.reshape(n, k // BLOCK, BLOCK)
    if bits == 8:
        scale = _fp16_exact(np.abs(blocks).max(axis=2) / np.float32(127))
        safe = np.where(scale > 0, scale, np.float32(1))
        q8 = np.clip(np.rint(blocks / safe[:, :, None]), -127, 127)
        q = (q8 + 128).astype(np.uint8).reshape(n, k)
        return BlockQuantized(8, q, scale.astype(np.float32), None, source or "rtn8")
    if bits != 4:
        raise ModelSourceError(f"block quantization takes 4 or 8 bits, not {bits}")
    low = np.minimum(blocks.min(axis=2), 0)  # the range includes 0: an exact zero point
    high = np.maximum(blocks.max(axis=2), 0)
    scale = _fp16_exact((high - low) / np.float32(15))
    safe = np.where(scale > 0, scale, np.float32(1))
    zero_point = np.clip(np.rint(-low / safe), 0, 15)
    q = np.clip(np.rint(blocks / safe[:, :, None]) + zero_point[:, :, None], 0, 15)
    return BlockQuantized(4, q.astype(np.uint8).reshape(n, k), scale.astype(np.float32), None,
                          source or "rtn4", zero_point.astype(np.uint8))


def _fp16_exact(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest fp16 (and back)."""
    return values.astype(np.float16).astype(np.float32)


def quantization_error(weight: np.ndarray, quantized: BlockQuantized) -> dict[str, float]:
    """Max and RMS absolute error of a quantized weight against the weight it stands for."""
    diff = quantized.dequantize() - np.asarray(weight, dtype=np.float32)
    return {"max": float(np.abs(diff).max()), "rms": float(np.sqrt(np.mean(diff * diff)))}
