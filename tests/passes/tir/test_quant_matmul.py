"""The dequantizing matmul kernels (CPU numerics vs NumPy, GPU mappings) and their weight
layout."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgert.model.block_quant import BLOCK, quantize_rtn  # noqa: E402
from edgert.passes.tir.matmul import MatmulKnobs  # noqa: E402
from edgert.passes.tir.quant_matmul import (  # noqa: E402
    SEARCH_SPACE,
    QuantizedWeight,
    dequantize_tir,
    pack_quantized,
    quant_matmul_reference,
    quant_matmul_tir,
)
from tests.passes.test_quantized_import import packed  # noqa: E402
from tests.passes.tir.gpu_targets import GPU_TARGETS  # noqa: E402

K, N = 96, 48
LLVM = tvm.target.Target({"kind": "llvm", "num-cores": 2})
RNG = np.random.default_rng(0)


def weight_of(bits: int, zero_points: bool = False) -> tuple[QuantizedWeight, np.ndarray]:
    """A QuantizedWeight read from MatMulNBits' inputs, and the blocks' own dequantization
    [K, N]. 8 bits: symmetric (MatMulNBits' default zero point); 4 bits: integer zero points
    or, with ``zero_points=False``, the default zero point 8."""
    w = quantize_rtn(RNG.standard_normal((N, K)).astype(np.float32), bits)
    b, scales, points = packed(w)
    if not zero_points:
        points = None
        q = w.q.astype(np.float32).reshape(N, -1, BLOCK)
        want = ((q - 2 ** (bits - 1)) * w.scale[:, :, None]).reshape(N, K).T
    else:
        want = w.dequantize().T
    return QuantizedWeight.from_matmul_nbits(b, scales, points, K, N, bits, BLOCK), want


def _build(func, name="k"):
    return tvm.tirx.build(tvm.IRModule({name: func.with_attr("global_symbol", name)}),
                          LLVM)[name]


@pytest.mark.parametrize("bits, zero_points", [(4, False), (4, True), (8, False)])
def test_weight_read_from_matmul_nbits(bits, zero_points):
    weight, want = weight_of(bits, zero_points)
    assert weight.words.dtype == np.int32 and weight.words.shape == (N, K * bits // 32)
    np.testing.assert_allclose(weight.dequantize(), want, rtol=0, atol=1e-6)


def test_panel_layout():
    weight, _ = weight_of(4)
    words, scale, bias = pack_quantized(weight, 16)
    assert words.shape == (N // 16, K // 8, 16)
    assert words[2, 5, 3] == weight.words[2 * 16 + 3, 5]
    assert scale[1, 2, 7] == weight.scale[16 + 7, 2] and bias[1, 2, 7] == weight.bias[16 + 7, 2]


@pytest.mark.parametrize("knobs", [MatmulKnobs(16, 1), MatmulKnobs(8, 2, 2),
                                   MatmulKnobs(48, 4), MatmulKnobs(8, 1, 3)])
@pytest.mark.parametrize("bits, zero_points", [(4, True), (8, False)])
@pytest.mark.parametrize("batch, rows", [(1, 1), (1, 3), (2, 5)])
def test_quant_matmul_matches_numpy(knobs, bits, zero_points, batch, rows):
    """fp32 accumulation against a float64 reference: the block sums differ from a
    dequantize-then-dot only in summation order (outputs up to ~20: atol 1e-4 is ~50 ulp)."""
    weight, _ = weight_of(bits, zero_points)
    kernel = _build(quant_matmul_tir(K, N, bits, BLOCK, knobs))
    x = RNG.standard_normal((batch, rows, K)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((batch, rows, N), np.float32))
    kernel(tvm.runtime.tensor(x), *map(tvm.runtime.tensor, pack_quantized(weight, knobs.bn)),
           out)
    np.testing.assert_allclose(out.numpy(), quant_matmul_reference(x, weight), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_kernel_matches_numpy(bits):
    weight, _ = weight_of(bits)
    out = tvm.runtime.tensor(np.zeros((K, N), np.float32))
    _build(dequantize_tir(K, N, bits, BLOCK))(
        *map(tvm.runtime.tensor, (weight.words, weight.scale, weight.bias)), out)
    np.testing.assert_array_equal(out.numpy(), weight.dequantize())


def test_shapes_the_kernel_does_not_take_are_named():
    with pytest.raises(ValueError, match="does not divide"):
        quant_matmul_tir(K, N, 4, BLOCK, MatmulKnobs(32, 1))
    with pytest.raises(ValueError, match="whole number of 32-value blocks"):
        quant_matmul_tir(K + 8, N, 4, BLOCK)
    with pytest.raises(ValueError, match="bits must be"):
        quant_matmul_tir(K, N, 3, BLOCK)
    assert all(k.bn * k.mb * k.streams <= 64 for k in SEARCH_SPACE)


@pytest.mark.parametrize("name", sorted(GPU_TARGETS))
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_mapping_builds(name, bits):
    target = GPU_TARGETS[name]
    func = quant_matmul_tir(K, 64, bits, BLOCK, gpu=True,
                            index_dtype="int32" if name == "webgpu" else "int64")
    mod = tvm.tirx.build(tvm.IRModule({"edgert_quant_matmul": func.with_attr(
        "global_symbol", "edgert_quant_matmul")}), tvm.target.Target(target, host="llvm"))
    source = mod.imports[0].inspect_source()
    assert "edgert_quant_matmul" in source
    if name == "webgpu":
        assert "i64" not in source
