"""The block-dequantizing matmul and the GPU matmul schedules as TVM generates them for opencl,
opencl -device=adreno and webgpu, executed against NumPy.

edgert's GPU builds leave fp32 matmuls to TVM: the target's legalize passes (LegalizeOps,
FuseOps, FuseTIR) and dlight's default schedules (generic GPU: Matmul, GEMV, Reduction,
GeneralReduction, Fallback; adreno: Reduction, GeneralReduction, Fallback). These tests run
those passes on a decoder-style projection (x [1, m, K] @ W + bias, then SiLU: one fused
kernel) and execute what they schedule, at dynamic m (decode, a tree, a prompt chunk) and at a
static m = 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgert.model.block_quant import BLOCK, quantize_rtn
from edgert.passes.tir.quant_matmul import (
    GPU_PANEL,
    QuantizedWeight,
    pack_quantized,
    quant_matmul_reference,
    quant_matmul_tir,
)
from tests.passes.test_quantized_import import packed

RTOL, ATOL = 1e-5, 1e-4  # fp32 sums in another order (see tests/passes/tir/test_quant_matmul)
MM_K, MM_N = 96, 80  # N not a multiple of dlight's tiles: a tail
Q_K, Q_N = 96, 2 * GPU_PANEL  # three 32-value blocks; two GPU panels


def quantized_weight(bits: int, zero_points: bool) -> QuantizedWeight:
    """A weight as MatMulNBits stores it (integer zero points, or its default one), read the
    way edgert's import reads it (as tests/passes/tir/test_quant_matmul does)."""
    w = quantize_rtn(np.random.default_rng(bits).standard_normal((Q_N, Q_K)).astype(np.float32),
                     bits)
    b, scales, points = packed(w)
    return QuantizedWeight.from_matmul_nbits(b, scales, points if zero_points else None, Q_K,
                                             Q_N, bits, BLOCK)


@pytest.mark.parametrize("bits, zero_points", [(4, False), (4, True), (8, False)])
def test_quant_matmul(gpu, bits, zero_points):
    weight = quantized_weight(bits, zero_points)
    built = gpu.build(("quant_matmul", bits), lambda: quant_matmul_tir(
        Q_K, Q_N, bits, BLOCK, gpu=True, index_dtype=gpu.index_dtype))
    rng = np.random.default_rng(bits)
    for batch, rows in ((1, 1), (1, 3), (2, 5)):
        x = rng.standard_normal((batch, rows, Q_K)).astype(np.float32)
        out = gpu.run(built, [x, *pack_quantized(weight, GPU_PANEL),
                              np.zeros((batch, rows, Q_N), np.float32)])
        np.testing.assert_allclose(out["out"], quant_matmul_reference(x, weight), rtol=RTOL,
                                   atol=ATOL, err_msg=f"{gpu.name}: {bits} bits, {batch}x{rows}")


def projection(rows, weight: np.ndarray, bias: np.ndarray):
    """Relax: silu(x [1, rows, K] @ weight + bias), ``rows`` an int or "m" (dynamic)."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64") if rows == "m" else rows
    x = relax.Var("x", relax.TensorType([1, m, weight.shape[0]], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(weight)))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            out = bb.emit_output(relax.op.nn.silu(y))
        bb.emit_func_output(out)
    return bb.get()


def scheduled_kernel(target: str, rows, weight, bias):
    """The one PrimFunc the target's legalize passes make of :func:`projection`, scheduled."""
    import tvm
    from tvm import relax

    from edgert.passes.gpu_launch import gpu_target

    tvm_target = gpu_target(target)
    with tvm_target:
        mod = tvm.transform.Sequential(relax.pipeline.legalize_passes(tvm_target))(
            projection(rows, weight, bias))
    funcs = [(gv.name_hint, f) for gv, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1, [name for name, _ in funcs]
    name, func = funcs[0]
    assert func.attrs.get("tirx.is_scheduled"), f"dlight left {name} unscheduled"
    return func.with_attr("global_symbol", name)


@pytest.mark.parametrize("rows", ["m", 1])
def test_gpu_matmul_schedule(gpu, rows):
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((MM_K, MM_N)).astype(np.float32)
    bias = rng.standard_normal(MM_N).astype(np.float32)
    built = gpu.build(("dlight_matmul", rows), lambda: scheduled_kernel(
        gpu.target, rows, weight, bias))
    for m in ((1, 3, 37, 130) if rows == "m" else (1,)):
        x = rng.standard_normal((1, m, MM_K)).astype(np.float32)
        want = x.astype(np.float64) @ weight + bias
        want = want / (1 + np.exp(-want))
        args = [x, weight, bias, np.zeros((1, m, MM_N), np.float32)]
        out = gpu.run(built, args)
        got = out[list(out)[-1]]
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{gpu.name}: {m} rows ({rows})")
