"""Block-quantized weights: GGUF blocks read bit-exactly, round-to-nearest quantization."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.errors import ModelSourceError
from edgert.model.block_quant import (
    BLOCK,
    BlockQuantized,
    from_gguf,
    minimum_as_rows,
    quantization_error,
    quantize_rtn,
)

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402


def random_weight(rows=24, cols=96, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantize_bit_exactly_as_gguf(type_name):
    weight = random_weight()
    ggml_type = gguf.GGMLQuantizationType[type_name]
    raw = quantize(weight, ggml_type)
    expected = np.asarray(dequantize(raw, ggml_type), dtype=np.float32).reshape(weight.shape)
    ours = from_gguf(raw, type_name, *weight.shape)
    np.testing.assert_array_equal(ours.dequantize(), expected)
    assert ours.q.dtype == np.uint8 and ours.q.max() < 2 ** ours.bits
    assert ours.scale.shape == (weight.shape[0], weight.shape[1] // BLOCK)


def test_q4_1_reads_nibbles_in_ggml_order():
    """Byte j of a Q4_1 block holds value j (low nibble) and value j + 16 (high nibble)."""
    block = np.zeros(20, dtype=np.uint8)
    block[0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)  # d = 1
    block[2:4] = np.array([0.5], dtype=np.float16).view(np.uint8)  # m = 0.5
    block[4] = 0x3A  # value 0 = 0xA, value 16 = 0x3
    w = from_gguf(block, "Q4_1", 1, 32)
    assert w.q[0, 0] == 10 and w.q[0, 16] == 3 and w.q[0, 1] == 0
    assert w.dequantize()[0, 0] == 10.5 and w.dequantize()[0, 16] == 3.5


def test_correction_makes_the_symmetric_form_equal_the_asymmetric_one():
    """scale * (q - zero) + (minimum + zero * scale) == scale * q + minimum, to fp32 rounding."""
    raw = quantize(random_weight(seed=1), gguf.GGMLQuantizationType.Q4_1)
    w = from_gguf(raw, "Q4_1", 24, 96)
    n, k = w.shape
    symmetric = (w.scale[:, :, None] * (w.q.reshape(n, k // BLOCK, BLOCK) - 8.0)
                 + w.correction()[:, :, None]).reshape(n, k)
    np.testing.assert_allclose(symmetric, w.dequantize(), rtol=0, atol=1e-6)
    assert from_gguf(quantize(random_weight(), gguf.GGMLQuantizationType.Q8_0), "Q8_0",
                     24, 96).correction() is None


@pytest.mark.parametrize("cols", [96, 1536])  # 3 block sums (one partial row block), 48 (two)
def test_minimum_rows_compute_the_weight_on_the_block_sums(cols):
    """[x, blocksum(x)] @ widened.T == x @ effective().T (float64 reference), and effective()
    is the Q4_1 weight with each block's minimum moved by at most half a 4-bit step of its
    rows' block (the only change: q and d stay as stored)."""
    w = from_gguf(quantize(random_weight(8, cols, seed=2), gguf.GGMLQuantizationType.Q4_1),
                  "Q4_1", 8, cols)
    folded = minimum_as_rows(w)
    n, k = w.shape
    blocks = k // BLOCK
    assert folded.inputs == k + blocks
    assert folded.widened.shape == (n, BLOCK * (blocks + -(-blocks // BLOCK)))
    np.testing.assert_array_equal(folded.widened.q[:, :k], w.q)
    np.testing.assert_array_equal(folded.widened.scale[:, :blocks], w.scale)

    x = np.random.default_rng(3).standard_normal((3, k))
    sums = x.reshape(3, blocks, BLOCK).sum(axis=2)
    widened = np.concatenate([x, sums], axis=1) @ folded.widened.dequantize()[:, :folded.inputs].T
    np.testing.assert_allclose(widened, x @ folded.effective().astype(np.float64).T, atol=1e-5)

    change = folded.effective() - w.dequantize()
    per_block = change.reshape(n, blocks, BLOCK)
    np.testing.assert_allclose(per_block, per_block[:, :, :1].repeat(BLOCK, axis=2), atol=1e-6)
    np.testing.assert_allclose(per_block[:, :, 0], folded.moved, atol=1e-6)
    step = np.repeat(folded.widened.scale[:, blocks:], BLOCK, axis=1)[:, :blocks]
    assert np.all(np.abs(folded.moved) <= step / 2 + 1e-6)
    assert folded.error()["max"] == pytest.approx(np.abs(folded.moved).max())
    # the integer zero points leave a remainder of at most half a scale: a small 4-bit range
    assert np.all(np.abs(folded.remainder()) <= w.scale / 2 + step / 2 + 1e-6)


def test_minimum_rows_take_only_4_bit_minimum_blocks():
    with pytest.raises(ValueError, match="minimum"):
        minimum_as_rows(quantize_rtn(random_weight(), 4))


def test_take_rows_moves_whole_blocks():
    w = from_gguf(quantize(random_weight(), gguf.GGMLQuantizationType.Q4_1), "Q4_1", 24, 96)
    rows = np.random.default_rng(0).permutation(24)
    np.testing.assert_array_equal(w.take_rows(rows).dequantize(), w.dequantize()[rows])


@pytest.mark.parametrize("bits, bound", [(4, 1 / 15), (8, 0.5 / 127)])
def test_rtn_error_is_bounded_by_the_step(bits, bound):
    """Round to nearest: 8 bits within half a step (2 max|w| / 254) of every weight; 4 bits
    within one step of the block's range with 0 in it ((max - min) / 15: half a step of
    rounding, half of the integer zero point's); up to the fp16 rounding of the stored
    scale (relative 2^-11 of the block's magnitude)."""
    weight = random_weight(seed=2)
    q = quantize_rtn(weight, bits)
    blocks = weight.reshape(24, 3, BLOCK)
    span = ((np.maximum(blocks.max(2), 0) - np.minimum(blocks.min(2), 0)) if bits == 4
            else 2 * np.abs(blocks).max(2))
    err = np.abs(q.dequantize() - weight).reshape(24, 3, BLOCK).max(2)
    magnitude = np.abs(blocks).max(2)
    assert np.all(err <= span * bound + magnitude * 2.0 ** -10)
    assert quantization_error(weight, q)["max"] == pytest.approx(float(err.max()))


def test_rtn_keeps_constant_blocks_to_fp16_precision():
    weight = np.full((2, 64), 0.25, dtype=np.float32)
    for bits in (4, 8):
        np.testing.assert_allclose(quantize_rtn(weight, bits).dequantize(), weight, rtol=2.0 ** -11)
    assert np.all(quantize_rtn(np.zeros((1, 32), np.float32), 8).dequantize() == 0)


def test_bad_inputs_are_named():
    with pytest.raises(ModelSourceError, match="truncated"):
        from_gguf(np.zeros(19, dtype=np.uint8), "Q4_1", 1, 32)
    with pytest.raises(ModelSourceError, match="no exact block form"):
        from_gguf(np.zeros(10, dtype=np.uint8), "Q6_K", 1, 256)
    with pytest.raises(ModelSourceError, match="multiple of 32"):
        quantize_rtn(np.zeros((2, 40), np.float32), 4)
    with pytest.raises(ModelSourceError, match="4 or 8 bits"):
        quantize_rtn(np.zeros((2, 32), np.float32), 3)


def test_rtn4_has_integer_zero_points_and_no_minimum():
    q = quantize_rtn(random_weight(seed=3), 4)
    assert q.form == "zero_point" and q.minimum is None and q.correction() is None
    assert q.zero_point.dtype == np.uint8 and q.zero_point.max() <= 15
    positive = quantize_rtn(np.abs(random_weight(seed=4)), 4)  # 0 is in every range
    np.testing.assert_array_equal(positive.zero_point, 0)


def test_packed_size():
    w = BlockQuantized(4, np.zeros((8, 64), np.uint8), np.ones((8, 2), np.float32),
                       np.zeros((8, 2), np.float32), "rtn4")
    assert w.nbytes == 8 * 64 // 2 + 8 * 2 * (2 + 2)  # nibbles, fp16 scale and minimum
