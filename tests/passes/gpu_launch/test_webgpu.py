"""gpu_launch.webgpu: TVM's WebGPU calling convention (uniform struct, grid packing) and the
WGSL facts edgert's kernels work around (naga: no infinity literal, reserved words)."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.passes.gpu_launch import KernelCompileError, LaunchArgumentError, build
from edgert.passes.gpu_launch.webgpu import pack_grid, scalar_word, shader_layout
from tests.passes.gpu_launch import programs
from tests.passes.gpu_launch.conftest import launcher_or_skip


@pytest.fixture(scope="module")
def webgpu():
    return launcher_or_skip("webgpu")


@pytest.mark.parametrize("x, packed", [(1, (1, 1)), (65535, (65535, 1)), (65536, (32768, 2)),
                                       (65537, (32769, 2)), (131075, (32769, 4))])
def test_pack_grid_halves_x_into_z(x, packed):
    assert pack_grid(x) == packed


def test_scalar_words():
    assert scalar_word(-2, "i32", "s") == np.int32(-2).tobytes()
    assert scalar_word(2.5, "f32", "s") == np.float32(2.5).tobytes()
    with pytest.raises(LaunchArgumentError, match="does not fit"):
        scalar_word(2 ** 31, "i32", "s")
    with pytest.raises(LaunchArgumentError, match="does not fit"):
        scalar_word(-1, "u32", "s")


def test_shader_layout_follows_the_operands():
    built = build(programs.vadd(), "webgpu")
    kernel = built.kernels["vadd_kernel"]
    layout = shader_layout(kernel)
    assert [(s.binding, s.writable) for s in layout.storage] == [
        (0, False), (1, False), (2, True)]  # A, B read; C written
    assert layout.uniform_binding == 3
    assert [t for _, t in layout.fields] == ["f32", "i32", "i32", "u32"]
    assert layout.fields[-1] == ("packGridDimX", "u32")


@pytest.mark.parametrize("total", [201, 131070, 131072, 131073, 262149])
def test_a_packed_grid_runs_every_item_once(webgpu, total):
    """Grids past 65535 workgroups (here ceildiv(total, 2)) go through z; with the guard of
    the last block's padding every item runs exactly once."""
    built = build(programs.count_items(lanes=2), "webgpu")
    hits = webgpu.run(built, None, [np.zeros(total + 4, np.int32), total])["hits"]
    assert (hits[:total] == 1).all() and not hits[total:].any()


def test_tvm_z_packing_guard_runs_one_block_too_many(webgpu):
    """TVM 0.27's WGSL returns when ``blockIdx.x > packGridDimX``, not ``>=``: where the
    packing rounds up (65537 -> 32769 x 2) block 65537 runs too, and a kernel with no guard of
    its own (one item per block: TVM drops the provable one) writes one item too many.
    Should this fail, TVM fixed it: update docs/passes.md ("GPU targets in CI")."""
    built = build(programs.count_items(lanes=1), "webgpu")
    assert "> podArgs.packGridDimX" in built.source
    total = 65537
    hits = webgpu.run(built, None, [np.zeros(total + 4, np.int32), total])["hits"]
    assert (hits[:total] == 1).all() and hits[total:].tolist() == [1, 0, 0, 0]


def infinity_store(literal: bool):
    """out[i] = -inf, as a float literal or as edgert's reinterpret of its bits."""
    from tvm.script import tirx as T

    from edgert.passes.tir.common import negative_infinity

    @T.prim_func(s_tir=True)
    def func(o: T.handle):
        T.func_attr({"global_symbol": "store_inf", "tirx.noalias": True})
        out = T.match_buffer(o, (4,), "float32")
        for tx in T.thread_binding(4, thread="threadIdx.x"):
            with T.sblock("store"):
                i = T.axis.spatial(4, tx)
                out[i] = T.float32(-np.inf) if literal else negative_infinity()

    return func


def test_wgsl_has_no_infinity_literal(webgpu):
    """TVM prints -inf as ``-inff``, which naga rejects; ``negative_infinity()`` (a bitcast
    of its bits) is accepted and stores -inf."""
    with pytest.raises(KernelCompileError) as info:
        webgpu.run(build(infinity_store(literal=True), "webgpu"), None, [np.zeros(4, np.float32)])
    assert "inff" in info.value.details
    out = webgpu.run(build(infinity_store(literal=False), "webgpu"), None,
                     [np.zeros(4, np.float32)])["out"]
    assert (out == -np.inf).all()


def test_naga_rejects_reserved_words(webgpu):
    """A local buffer named ``where`` (top-k's, before the fix) is a WGSL reserved word."""
    built = build(programs.vadd(), "webgpu")
    kernel = built.kernels["vadd_kernel"]
    kernel.source = kernel.source.replace("C_ptr", "where")
    with pytest.raises(KernelCompileError, match="reserved"):
        webgpu.device.compile(kernel)


def test_float16_runs_where_the_adapter_has_shader_f16(webgpu):
    if "shader-f16" not in webgpu.device.features:
        pytest.skip("this adapter has no shader-f16")
    x = np.arange(8, dtype=np.float16) / 4
    out = webgpu.run(build(programs.half_copy(), "webgpu"), None, [x, np.zeros_like(x)])
    np.testing.assert_array_equal(out["out"], x * 2)
