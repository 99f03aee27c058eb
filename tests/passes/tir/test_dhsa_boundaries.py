"""The DHSA boundary TIR kernel against the NumPy reference (``chunk_starts(boundary_ratios)``),
dynamic and fixed chunks, and its GPU mapping building for cuda, opencl (adreno) and metal.

The starts must be equal, not close: they are booleans (ratios near the threshold could flip
on float32 reordering; the random inputs here have none that close)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgert.dhsa import reference
from edgert.dhsa.params import DHSAParams
from tests.passes.tir.gpu_targets import GPU_TARGETS

tvm = pytest.importorskip("tvm")

HQ, HKV, D = 4, 2, 16
SMALL = DHSAParams(block_size=16, budget=48, local=16, sink=4, dense_tail=8, probe_stride=8,
                   min_context=64, early_layers=0, boundary_threshold=2.0)
LLVM = {"kind": "llvm", "num-cores": 2}


def build_llvm(params: DHSAParams, index_dtype: str = "int64"):
    from edgert.passes.tir.dhsa_boundaries import dhsa_boundaries_tir

    mod = tvm.IRModule({"edgert_dhsa_boundaries": dhsa_boundaries_tir(
        HQ, HKV, D, params, index_dtype=index_dtype)})
    return tvm.tirx.build(mod, tvm.target.Target(LLVM))["edgert_dhsa_boundaries"]


@pytest.fixture(scope="module")
def kernels():
    """SMALL, and a low threshold so that random inputs have many boundaries."""
    low = dataclasses.replace(SMALL, boundary_threshold=1.1)
    return {SMALL: build_llvm(SMALL), low: build_llvm(low)}


def run_kernel(kernel, q, k, fixed_chunk: int = 0) -> np.ndarray:
    out = tvm.runtime.tensor(np.full(q.shape[0], 7, np.int32))
    kernel(tvm.runtime.tensor(q), tvm.runtime.tensor(k), fixed_chunk, out)
    return out.numpy()


def reference_starts(q, k, params: DHSAParams, fixed_chunk: int = 0) -> np.ndarray:
    """The reference on the kernel's layout ([T, H, D] in)."""
    params = dataclasses.replace(params, fixed_chunk=fixed_chunk)
    qh, kh = q.transpose(1, 0, 2), k.transpose(1, 0, 2)
    return reference.chunk_starts(reference.boundary_ratios(qh, kh, params), params)


def random_qk(seq_len: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((seq_len, HQ, D)).astype(np.float32),
            rng.standard_normal((seq_len, HKV, D)).astype(np.float32))


@pytest.mark.parametrize("seq_len", [5, 20, 48, 150, 301])
@pytest.mark.parametrize("threshold", [2.0, 1.1])
def test_dynamic_starts_match_reference(kernels, seq_len, threshold):
    params = dataclasses.replace(SMALL, boundary_threshold=threshold)
    q, k = random_qk(seq_len, seed=seq_len)
    expected = reference_starts(q, k, params)
    if threshold < 2 and seq_len > 40:
        assert expected.sum() > 3  # boundaries besides token 0 and the dense tail
    np.testing.assert_array_equal(run_kernel(kernels[params], q, k), expected)


@pytest.mark.parametrize("seq_len", [20, 150])
@pytest.mark.parametrize("fixed", [1, 10, 64])
def test_fixed_chunks(kernels, seq_len, fixed):
    q, k = random_qk(seq_len, seed=1)
    starts = run_kernel(kernels[SMALL], q, k, fixed)
    np.testing.assert_array_equal(starts, reference_starts(q, k, SMALL, fixed))
    assert starts.tolist() == [int(t % fixed == 0) for t in range(seq_len)]  # no tail start


def test_structured_boundaries(kernels):
    """Keys with attention-mass jumps at 40, 60, 100, 110: the dynamic rule fires there."""
    seq_len = 160
    rng = np.random.default_rng(5)
    q = rng.standard_normal((seq_len, HQ, D)).astype(np.float32) * 0.2
    k = rng.standard_normal((seq_len, HKV, D)).astype(np.float32) * 0.2
    q[:, :, 0] += 3.0
    k[40:60, :, 0] += 3.0
    k[100:110, :, 0] += 3.0
    starts = run_kernel(kernels[SMALL], q, k)
    np.testing.assert_array_equal(starts, reference_starts(q, k, SMALL))
    assert np.flatnonzero(starts).tolist() == [0, 40, 60, 100, 110, seq_len - SMALL.dense_tail]


@pytest.mark.parametrize("fixed", [0, 10])
def test_int32_indices_match_reference(fixed):
    """The WebGPU variant (int32 lengths and indices) computes the same starts."""
    params = dataclasses.replace(SMALL, boundary_threshold=1.1)
    q, k = random_qk(150, seed=3)
    np.testing.assert_array_equal(run_kernel(build_llvm(params, "int32"), q, k, fixed),
                                  reference_starts(q, k, params, fixed))


def test_no_dense_tail():
    params = dataclasses.replace(SMALL, dense_tail=0, boundary_threshold=1.1, nms_radius=2,
                                 boundary_window=2, probe_stride=5)
    q, k = random_qk(97, seed=9)
    np.testing.assert_array_equal(run_kernel(build_llvm(params), q, k),
                                  reference_starts(q, k, params))



@pytest.mark.parametrize("name", list(GPU_TARGETS))
def test_gpu_mapping_builds(name):
    from edgert.passes.tir.dhsa_boundaries import dhsa_boundaries_tir

    int32 = name == "webgpu"  # WGSL has no 64-bit integers
    mod = tvm.IRModule({"edgert_dhsa_boundaries": dhsa_boundaries_tir(
        HQ, HKV, D, SMALL, gpu=True, index_dtype="int32" if int32 else "int64")})
    target = tvm.target.Target(GPU_TARGETS[name], host={"kind": "llvm"})
    source = tvm.tirx.build(mod, target).imports[0].inspect_source()
    assert "edgert_dhsa_boundaries" in source
    if int32:
        assert "i64" not in source
