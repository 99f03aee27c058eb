"""The fused DHSA TIR kernel against the NumPy reference (edgert.dhsa.reference), and its GPU
mapping building for cuda, opencl (adreno), metal and webgpu.

Outputs are compared with atol 1e-5 (float32; the kernel sums in a different order than NumPy)."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.dhsa import reference
from edgert.dhsa.params import DHSAParams
from edgert.passes.tir.dhsa_attention import DHSAKnobs
from tests.passes.tir.gpu_targets import GPU_TARGETS

tvm = pytest.importorskip("tvm")

HQ, HKV, D = 4, 2, 8
SMALL = DHSAParams(block_size=16, budget=48, local=16, sink=8, dense_tail=8, min_context=48,
                   early_layers=0)
LLVM = {"kind": "llvm", "num-cores": 2}
ATOL = 1e-5


def build_llvm(params: DHSAParams, knobs: DHSAKnobs = DHSAKnobs(), index_dtype: str = "int64"):
    from edgert.passes.tir.dhsa_attention import dhsa_attention_tir

    mod = tvm.IRModule({"edgert_dhsa_attention": dhsa_attention_tir(
        HQ, HKV, D, params, knobs=knobs, index_dtype=index_dtype)})
    return tvm.tirx.build(mod, tvm.target.Target(LLVM))["edgert_dhsa_attention"]


@pytest.fixture(scope="module", params=[(DHSAKnobs(), "int64"), (DHSAKnobs(2, 8), "int64"),
                                        (DHSAKnobs(1, 3), "int64"), (DHSAKnobs(), "int32")],
                ids=str)
def kernel(request):
    """The untuned schedule, two tuned ones (K/V loads shared by a KV group's heads; key
    tiles, one not dividing the key counts) and int32 indices (WebGPU's): all must compute the
    same attention."""
    return build_llvm(SMALL, *request.param)


def test_knobs_that_do_not_fit_are_refused():
    from edgert.passes.tir.dhsa_attention import dhsa_attention_tir

    with pytest.raises(ValueError, match="do not fit"):
        dhsa_attention_tir(HQ, HKV, D, SMALL, knobs=DHSAKnobs(heads_per_task=3))


def run_kernel(kernel, q, k, v, starts) -> np.ndarray:
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    kernel(tvm.runtime.tensor(q), tvm.runtime.tensor(k), tvm.runtime.tensor(v),
           tvm.runtime.tensor(starts.astype(np.int32)), out)
    return out.numpy()


def heads_first(*arrays):
    return [a.transpose(1, 0, 2) for a in arrays]


def reference_output(q, k, v, starts, params) -> np.ndarray:
    """The reference on the kernel's layout ([T, H, D] in and out)."""
    qh, kh, vh = heads_first(q, k, v)
    scores = reference.token_scores(qh, kh, starts.astype(bool), params)
    selection = reference.select_keys(scores, q.shape[0], params)
    return reference.sparse_attention(qh, kh, vh, selection, params).transpose(1, 0, 2)


def random_qkv(seq_len: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((seq_len, HQ, D)).astype(np.float32),
            rng.standard_normal((seq_len, HKV, D)).astype(np.float32),
            rng.standard_normal((seq_len, HKV, D)).astype(np.float32))


def random_starts(seq_len: int, seed: int) -> np.ndarray:
    starts = np.random.default_rng(seed).random(seq_len) < 0.15
    starts[0] = True
    return starts


def fixed_starts(seq_len: int, every: int = 12) -> np.ndarray:
    starts = np.zeros(seq_len, bool)
    starts[::every] = True
    return starts


@pytest.mark.parametrize("seq_len", [20, 64, 150, 301])
@pytest.mark.parametrize("chunks", ["random", "fixed"])
def test_kernel_matches_reference(kernel, seq_len, chunks):
    q, k, v = random_qkv(seq_len, seed=seq_len)
    starts = random_starts(seq_len, seq_len) if chunks == "random" else fixed_starts(seq_len)
    np.testing.assert_allclose(run_kernel(kernel, q, k, v, starts),
                               reference_output(q, k, v, starts, SMALL), atol=ATOL)


def test_every_token_its_own_chunk(kernel):
    q, k, v = random_qkv(97, seed=7)
    starts = np.ones(97, bool)
    np.testing.assert_allclose(run_kernel(kernel, q, k, v, starts),
                               reference_output(q, k, v, starts, SMALL), atol=ATOL)


@pytest.mark.parametrize("center", [1, 0])
def test_centred_and_uncentred_keys_match_reference(center):
    """Keys with a common direction the queries share, in variable-length chunks: there the
    key centring changes the selection, and the kernel follows the reference either way."""
    import dataclasses

    seq_len = 200
    q, k, v = random_qkv(seq_len, seed=11)
    k += 2.0 * np.eye(D, dtype=np.float32)[0]
    q += 1.0 * np.eye(D, dtype=np.float32)[0]
    starts = random_starts(seq_len, 11)
    params = dataclasses.replace(SMALL, center_keys=center)
    want = reference_output(q, k, v, starts, params)
    np.testing.assert_allclose(run_kernel(build_llvm(params), q, k, v, starts), want,
                               atol=ATOL)
    other = reference_output(q, k, v, starts, dataclasses.replace(params,
                                                                  center_keys=1 - center))
    assert np.abs(other - want).max() > 1e-2


def test_equal_scores_keep_the_lower_indices(kernel):
    # k = 0: every chunk scores 0, so each block's free places go to its earliest free keys
    # (the reference's stable sort); v tells which keys were attended
    seq_len = 120
    q, _, v = random_qkv(seq_len, seed=3)
    k = np.zeros((seq_len, HKV, D), np.float32)
    starts = fixed_starts(seq_len, every=5)
    np.testing.assert_allclose(run_kernel(kernel, q, k, v, starts),
                               reference_output(q, k, v, starts, SMALL), atol=ATOL)


def test_budget_covering_the_context_equals_dense():
    params = DHSAParams(block_size=16, budget=128, local=16, sink=8, dense_tail=8,
                        min_context=128)
    q, k, v = random_qkv(128, seed=1)
    out = run_kernel(build_llvm(params), q, k, v, random_starts(128, 1))
    dense = reference.dense_attention(*heads_first(q, k, v)).transpose(1, 0, 2)
    np.testing.assert_allclose(out, dense, atol=ATOL)


def test_selection_picks_the_far_chunk_that_scores_highest(kernel):
    # 8-token chunks; every query and the keys of chunk [48, 56) point along one direction,
    # the other keys are small noise: for the last block [144, 160) that chunk (outside its
    # sink [0, 8) and local [144, 160) keys) must win a free place, and its values dominate
    seq_len, far = 160, slice(48, 56)
    rng = np.random.default_rng(5)
    direction = np.zeros(D, np.float32)
    direction[0] = 1.0
    q = (rng.standard_normal((seq_len, HQ, D)) * 0.1 + 2.0 * direction).astype(np.float32)
    k = (rng.standard_normal((seq_len, HKV, D)) * 0.1).astype(np.float32)
    k[far] += 6.0 * direction
    v = (rng.standard_normal((seq_len, HKV, D)) * 0.1).astype(np.float32)
    v[far] = 5.0
    starts = fixed_starts(seq_len, every=8)

    qh, kh, _ = heads_first(q, k, v)
    selection = reference.select_keys(reference.token_scores(qh, kh, starts, SMALL), seq_len,
                                      SMALL)
    last = seq_len // SMALL.block_size - 1
    assert set(range(48, 56)) <= set(selection.keys(last).tolist())

    out = run_kernel(kernel, q, k, v, starts)
    np.testing.assert_allclose(out, reference_output(q, k, v, starts, SMALL), atol=ATOL)
    assert (out[144:152] > 4.0).all()  # the non-tail queries of the last block read the chunk



@pytest.mark.parametrize("name", list(GPU_TARGETS))
def test_gpu_mapping_builds(name):
    from edgert.passes.tir.dhsa_attention import dhsa_attention_tir

    mod = tvm.IRModule({"edgert_dhsa_attention": dhsa_attention_tir(
        HQ, HKV, D, SMALL, gpu=True, knobs=DHSAKnobs(2, 8),
        index_dtype="int32" if name == "webgpu" else "int64")})
    target = tvm.target.Target(GPU_TARGETS[name], host={"kind": "llvm"})
    source = tvm.tirx.build(mod, target).imports[0].inspect_source()
    assert "edgert_dhsa_attention" in source
    if name == "webgpu":
        assert "i64" not in source  # WGSL has no 64-bit integers: indices narrowed to i32
